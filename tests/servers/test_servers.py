"""The test servers themselves: real S3 (SeaweedFS) and the local Hub-protocol server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.fs as pafs
import pytest


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
