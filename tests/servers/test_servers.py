"""The test servers themselves: real S3 (SeaweedFS) and the local Hub-protocol server."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import huggingface_hub
import numpy as np
import pyarrow.fs as pafs
import pytest

from servers.hub import use_hub


def write_checkpoint(directory, size: int = 6 * 2**20 + 123) -> bytes:
    """A multi-MiB file named like a shard (its bytes are random: only their equality matters)
    and a config beside it."""
    directory.mkdir(parents=True)
    data = np.random.default_rng(size).bytes(size)
    (directory / "model.safetensors").write_bytes(data)
    (directory / "config.json").write_text('{"model_type": "llama"}')
    return data


@pytest.fixture(scope="module")
def uploaded(s3_server, tmp_path_factory):
    local = tmp_path_factory.mktemp("checkpoint") / "ft-a"
    data = write_checkpoint(local)
    paths = s3_server.upload_directory(local, "models/ft-a")
    return data, paths


def test_upload_keeps_exact_bytes_and_ranges_read_back(s3_server, uploaded):
    data, paths = uploaded
    assert paths == ["models/ft-a/config.json", "models/ft-a/model.safetensors"]
    filesystem = s3_server.filesystem()
    assert filesystem.get_file_info("models/ft-a/model.safetensors").size == len(data)
    with filesystem.open_input_file("models/ft-a/model.safetensors") as file:
        assert file.read_at(8, 0) == data[:8]
        assert file.read_at(100_000, 5 * 2**20) == data[5 * 2**20:5 * 2**20 + 100_000]
        assert file.read() == data


def test_ranged_reads_in_parallel(s3_server, uploaded):
    data, _ = uploaded
    filesystem = s3_server.filesystem()
    ranges = [(offset, 700_001) for offset in range(0, len(data) - 700_001, 500_000)]

    def read(span):
        with filesystem.open_input_file("models/ft-a/model.safetensors") as file:
            return file.read_at(span[1], span[0])

    with ThreadPoolExecutor(8) as pool:
        for (offset, length), got in zip(ranges, pool.map(read, ranges)):
            assert got == data[offset:offset + length]


def test_wrong_secret_and_identity_without_rights_are_refused(s3_server, uploaded):
    for access_key, secret_key in [(s3_server.access_key, "not-the-secret"),
                                   (s3_server.denied_access_key, s3_server.denied_secret_key)]:
        filesystem = s3_server.filesystem(access_key, secret_key)
        with pytest.raises(OSError, match="ACCESS_DENIED"):
            filesystem.open_input_file("models/ft-a/config.json")
    anonymous = pafs.S3FileSystem(anonymous=True, endpoint_override=s3_server.endpoint_url,
                                  scheme="http")
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        anonymous.open_input_file("models/ft-a/config.json")


def test_recorder_logs_ranges_and_injects_transient_errors(s3_server, s3_recorder, uploaded):
    data, _ = uploaded
    filesystem = s3_server.filesystem(endpoint_url=s3_recorder.endpoint_url)
    with filesystem.open_input_file("models/ft-a/model.safetensors") as file:
        assert file.read_at(8, 0) == data[:8]
        s3_recorder.fail_next(1)
        assert file.read_at(5000, 2**20) == data[2**20:2**20 + 5000]
    assert s3_recorder.ranges("models/ft-a/model.safetensors") == [
        "bytes=0-7", f"bytes={2**20}-{2**20 + 4999}", f"bytes={2**20}-{2**20 + 4999}"]
    gets = [request for request in s3_recorder.requests if request.method == "GET"]
    assert [(get.status, get.bytes_sent) for get in gets] == [(206, 8), (503, 0), (206, 5000)]


def test_stop_and_start_keep_ports_and_data(s3_server, uploaded):
    data, _ = uploaded
    endpoint = s3_server.endpoint_url
    s3_server.stop()
    with pytest.raises(OSError):
        s3_server.filesystem(connect_timeout=1, request_timeout=1).get_file_info(
            "models/ft-a/config.json")
    s3_server.start()
    assert s3_server.endpoint_url == endpoint
    with s3_server.filesystem().open_input_file("models/ft-a/model.safetensors") as file:
        assert file.read() == data


def test_env_names_the_server_and_its_admin(s3_server):
    env = s3_server.env()
    assert env["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    assert env["AWS_ACCESS_KEY_ID"] == s3_server.access_key
    assert env["AWS_SECRET_ACCESS_KEY"] == s3_server.secret_key
    info = s3_server.filesystem().get_file_info(pafs.FileSelector("/"))
    assert "models" in [entry.base_name for entry in info]


@pytest.fixture(scope="module")
def hub_repo(hub_server, tmp_path_factory):
    local = tmp_path_factory.mktemp("hub") / "ft-b"
    data = write_checkpoint(local, size=3 * 2**20 + 11)
    commit = hub_server.add_repo("org/ft-b", local)
    return local, data, commit


@pytest.fixture
def online(hub_server, monkeypatch, tmp_path):
    use_hub(monkeypatch, hub_server, cache_dir=tmp_path / "hf-cache")
    hub_server.clear_requests()
    return hub_server


def test_hf_hub_download_small_and_lfs_files(online, hub_repo):
    local, data, commit = hub_repo
    config = huggingface_hub.hf_hub_download("org/ft-b", "config.json")
    assert Path(config).read_bytes() == (local / "config.json").read_bytes()
    assert Path(config).parent.name == commit
    weights = huggingface_hub.hf_hub_download("org/ft-b", "model.safetensors", revision=commit)
    assert Path(weights).read_bytes() == data
    served = [(r.method, r.status, r.cdn, r.path.rsplit("/", 1)[-1]) for r in online.requests]
    assert ("HEAD", 302, False, "model.safetensors") in served
    assert ("GET", 200, True, hashlib.sha256(data).hexdigest()) in served


def test_model_info_with_files_metadata_and_paths_info(online, hub_repo):
    _, data, commit = hub_repo
    api = huggingface_hub.HfApi()
    info = api.model_info("org/ft-b", revision="main", files_metadata=True)
    assert info.sha == commit
    siblings = {sibling.rfilename: sibling for sibling in info.siblings}
    assert siblings["model.safetensors"].lfs.sha256 == hashlib.sha256(data).hexdigest()
    assert siblings["model.safetensors"].size == len(data)
    assert siblings["config.json"].lfs is None and len(siblings["config.json"].blob_id) == 40
    [entry] = api.get_paths_info("org/ft-b", ["model.safetensors"], revision=commit)
    assert entry.lfs.sha256 == hashlib.sha256(data).hexdigest() and entry.size == len(data)


def test_file_metadata_and_a_plain_http_range_request(online, hub_repo):
    _, data, commit = hub_repo
    url = huggingface_hub.hf_hub_url("org/ft-b", "model.safetensors")
    metadata = huggingface_hub.get_hf_file_metadata(url)
    assert (metadata.commit_hash, metadata.size) == (commit, len(data))
    assert metadata.etag == hashlib.sha256(data).hexdigest()
    assert metadata.location.startswith("http://127.0.0.1:") and metadata.location != url
    request = urllib.request.Request(metadata.location, headers={"Range": "bytes=1000-1999"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
        assert response.read() == data[1000:2000]
    assert online.requests[-1].range == "bytes=1000-1999"
    assert online.requests[-1].bytes_sent == 1000


@pytest.mark.parametrize("call, error", [
    (lambda: huggingface_hub.model_info("org/absent"), "RepositoryNotFoundError"),
    (lambda: huggingface_hub.model_info("org/ft-b", revision="v9"), "RevisionNotFoundError"),
    (lambda: huggingface_hub.get_hf_file_metadata(
        huggingface_hub.hf_hub_url("org/ft-b", "absent.json")), "RemoteEntryNotFoundError"),
    (lambda: huggingface_hub.model_info("org/private", token=False), "RepositoryNotFoundError"),
    (lambda: huggingface_hub.model_info("org/ft-b", token="hf_wrong"), "HfHubHTTPError"),
])
def test_errors_as_the_hub_gives_them(online, hub_repo, call, error):
    local, _, _ = hub_repo
    online.add_repo("org/private", local, private=True)
    with pytest.raises(huggingface_hub.errors.HfHubHTTPError) as raised:
        call()
    assert type(raised.value).__name__ == error


def test_injected_transient_failure(online, hub_repo):
    url = huggingface_hub.hf_hub_url("org/ft-b", "config.json")
    online.fail_next(1)
    with pytest.raises(urllib.error.HTTPError, match="503"):
        urllib.request.urlopen(url)
    with urllib.request.urlopen(url) as response:
        assert response.status == 200


def test_private_repo_with_a_known_token(online, hub_repo):
    local, _, _ = hub_repo
    online.add_repo("org/private", local, private=True)
    online.add_token("hf_known")
    assert huggingface_hub.model_info("org/private", token="hf_known").id == "org/private"


def test_hf_file_system_lists_and_reads_a_range(online, hub_repo):
    _, data, commit = hub_repo
    filesystem = huggingface_hub.HfFileSystem(skip_instance_cache=True)
    assert filesystem.ls(f"org/ft-b@{commit}", detail=False) == [
        f"org/ft-b@{commit}/config.json", f"org/ft-b@{commit}/model.safetensors"]
    with filesystem.open(f"org/ft-b@{commit}/model.safetensors", "rb", block_size=2**16) as file:
        file.seek(2**21)
        assert file.read(500) == data[2**21:2**21 + 500]
    [cdn_get] = [request for request in online.requests if request.cdn]
    assert cdn_get.range.startswith(f"bytes={2**21}-") and cdn_get.bytes_sent < 2**17
