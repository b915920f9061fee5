"""An output in object storage (a real S3 server, SeaweedFS): shards uploaded as they are
finished, the manifest last; a merge interrupted and rerun from a new driver with an empty local
disk resumes from the store alone to the same bytes as a local merge; `regenerate` reads the
published manifest from the store."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from helpers import write_recipe

from raymerge.cli import main
from raymerge.merge import prepare, run_merge
from raymerge.progress import MergeProgress
from raymerge.recipe import load_recipe

BUCKET = "outputs"


class Interrupted(BaseException):
    """The driver killed mid-merge (as a KeyboardInterrupt or a lost head pod would)."""


@pytest.fixture(scope="module")
def bucket(s3_server):
    s3_server.make_bucket(BUCKET)
    return s3_server.filesystem()


def objects(filesystem, prefix: str) -> dict[str, bytes]:
    from pyarrow import fs

    found = {}
    for info in filesystem.get_file_info(fs.FileSelector(prefix, recursive=True,
                                                         allow_not_found=True)):
        if info.type == fs.FileType.File:
            with filesystem.open_input_stream(info.path) as stream:
                found[info.path[len(prefix) + 1:]] = stream.read()
    return found


def recipe(family: dict, out: str, method: dict, endpoint: str | None = None) -> dict:
    data = {"base": str(family["base"]), "sources": [str(p) for p in family["sources"][:2]],
            "method": method, "output": {"path": out, "shard_size": "20KB"},
            "runtime": {"max_in_flight": 1}}
    return data | ({"storage": {"endpoint": endpoint, "retries": 2}} if endpoint else {})


def test_an_output_in_s3_resumes_from_the_store_and_equals_the_local_merge(
        ray_cluster, float32_family, s3_server, bucket, tmp_path, monkeypatch, capsys):
    uri = f"s3://{BUCKET}/team/merged"
    endpoint = s3_server.endpoint_url
    ties = {"name": "ties", "density": 0.5}
    task_arithmetic = {"name": "task_arithmetic"}
    earlier = write_recipe(tmp_path / "earlier.yaml",
                           recipe(float32_family, uri, ties, endpoint))
    s3_recipe = write_recipe(tmp_path / "s3.yaml",
                             recipe(float32_family, uri, task_arithmetic, endpoint))
    local_recipe = write_recipe(tmp_path / "local.yaml",
                                recipe(float32_family, str(tmp_path / "local"), task_arithmetic))
    monkeypatch.setenv("RAYMERGE_STAGING", str(tmp_path / "driver-1"))
    assert main(["merge", str(earlier), "--no-progress"]) == 0
    previous = objects(bucket, f"{BUCKET}/team/merged")
    previous_id = json.loads(previous["raymerge_manifest.json"])["submission_id"]
    assert len([name for name in previous if name.endswith(".safetensors")]) >= 4

    # Killed once a unit is finished in the store: the previous output is still whole.
    advance, seen = MergeProgress.advance, {}

    def advance_until_stored(self, stats):
        advance(self, stats)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            staged = objects(bucket, f"{BUCKET}/team/.merged.raymerge-staging")
            progress = json.loads(staged.get("raymerge_progress.json", b"{}"))
            if progress.get("units"):
                seen.update(staged=staged, target=objects(bucket, f"{BUCKET}/team/merged"))
                raise Interrupted
            time.sleep(0.1)

    monkeypatch.setattr(MergeProgress, "advance", advance_until_stored)
    with pytest.raises(Interrupted):
        run_merge(prepare(load_recipe(s3_recipe)), show_progress=False)
    assert seen["target"] == previous  # the new output is not visible, the old one intact
    assert any(name.endswith(".safetensors") for name in seen["staged"])
    assert "raymerge_manifest.json" not in seen["staged"]

    # A new driver: another local staging directory, empty.
    monkeypatch.setattr(MergeProgress, "advance", advance)
    monkeypatch.setenv("RAYMERGE_STAGING", str(tmp_path / "driver-2"))
    assert main(["merge", str(s3_recipe), "--no-progress"]) == 0
    assert main(["merge", str(local_recipe), "--no-progress"]) == 0
    stored = objects(bucket, f"{BUCKET}/team/merged")
    local = {path.relative_to(tmp_path / "local").as_posix(): path.read_bytes()
             for path in (tmp_path / "local").rglob("*") if path.is_file()}
    assert stored.keys() == local.keys()
    shards = [name for name in local if name.endswith(".safetensors")]
    assert [stored[name] for name in shards] == [local[name] for name in shards]
    stored_manifest = json.loads(stored["raymerge_manifest.json"])
    assert stored_manifest["summary"]["resumed_units"] >= 1
    assert stored_manifest["submission_id"] != previous_id
    assert objects(bucket, f"{BUCKET}/team/.merged.raymerge-staging") == {}
    assert not any((tmp_path / "driver-2").rglob("*.safetensors"))  # nothing left locally

    # inspect reads it where it is (headers and small files: the manifest, the statistics)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    capsys.readouterr()
    assert main(["inspect", uri]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{uri}: 30 tensors") and "task_arithmetic of 2 sources" in printed

    # regenerate decides from the store's manifest
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({"models": [{"name": "team", "recipe": "s3.yaml"}]}))
    capsys.readouterr()
    assert main(["regenerate", str(registry), "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert record["status"] == "unchanged" and record["output"] == uri


@pytest.mark.parametrize("where, expected", [
    ("s3://no-such-bucket-here/merged", "no-such-bucket-here"),
    ("s3://outputs", "give a prefix inside a bucket"),
])
def test_a_bad_output_uri_is_one_line_before_any_work(float32_family, s3_server, bucket,
                                                       tmp_path, capsys, where, expected):
    path = write_recipe(tmp_path / "bad.yaml", recipe(
        float32_family, where, {"name": "task_arithmetic"}, s3_server.endpoint_url))
    assert main(["merge", str(path), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and expected in error


def test_an_output_prefix_holding_other_files_is_refused(float32_family, s3_server, bucket,
                                                          tmp_path, capsys):
    with bucket.open_output_stream(f"{BUCKET}/someone-else/data.csv") as stream:
        stream.write(b"a,b\n")
    path = write_recipe(tmp_path / "r.yaml", recipe(
        float32_family, f"s3://{BUCKET}/someone-else", {"name": "task_arithmetic"},
        s3_server.endpoint_url))
    assert main(["merge", str(path), "--no-progress"]) == 2
    assert "is not a raymerge output" in capsys.readouterr().err
    assert objects(bucket, f"{BUCKET}/someone-else") == {"data.csv": b"a,b\n"}


def put(filesystem, path: str, text: str) -> None:
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode())


def test_regenerate_with_registry_recipes_outputs_and_factor_cache_in_s3(
        ray_cluster, float32_family, s3_server, bucket, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)  # the registry's reader
    monkeypatch.setenv("RAYMERGE_STAGING", str(tmp_path / "driver"))
    base, sources = float32_family["base"], float32_family["sources"]

    def axis(count: int, name: str = "team") -> str:
        return yaml.safe_dump({
            "base": str(base), "sources": [str(p) for p in sources[:count]],
            "method": {"name": "axis", "k": 6}, "calibrate": {"svc": {"alpha": "auto"}},
            "output": {"path": f"s3://{BUCKET}/nightly/{name}"},
            "storage": {"endpoint": s3_server.endpoint_url}})

    import raymerge.merge

    real = raymerge.merge.run_merge

    def crashing(prepared, **kwargs):  # a bug, a library's error: not raymerge's own
        if str(prepared.output).endswith("/crash"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(prepared, **kwargs)

    monkeypatch.setattr(raymerge.merge, "run_merge", crashing)
    put(bucket, f"{BUCKET}/config/recipes/team.yaml", axis(2))
    put(bucket, f"{BUCKET}/config/recipes/crash.yaml", axis(2, "crash"))
    put(bucket, f"{BUCKET}/config/registry.yaml", yaml.safe_dump({
        "factor_cache": f"s3://{BUCKET}/factors",
        "models": [{"name": "missing", "recipe": "recipes/missing.yaml"},
                   {"name": "crash", "recipe": "recipes/crash.yaml"},
                   {"name": "team", "recipe": "recipes/team.yaml"}]}))
    registry = f"s3://{BUCKET}/config/registry.yaml"

    def regenerate() -> dict[str, dict]:
        code = main(["regenerate", registry, "--json"])
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
                 if line.startswith("{")]
        assert code == 1 and lines[-1]["failed"] == ["missing", "crash"]  # the next one ran
        return {line["name"]: line for line in lines[:-1]}

    first = regenerate()
    assert "recipes/missing.yaml not found" in first["missing"]["error"]
    assert "the merge crashed (RuntimeError: CUDA error" in first["crash"]["error"]
    assert first["team"]["status"] == "merged" and first["team"]["factor_cache_hits"] == 0
    assert first["team"]["factor_cache_misses"] == 2 * 3 * 7  # two sources, 21 matrices
    assert objects(bucket, f"{BUCKET}/factors")
    assert regenerate()["team"]["status"] == "unchanged"
    put(bucket, f"{BUCKET}/config/recipes/team.yaml", axis(3))  # a new fine-tune lands
    third = regenerate()["team"]
    assert third["status"] == "merged" and third["submission_id"] != first["team"]["submission_id"]
    assert (third["factor_cache_hits"], third["factor_cache_misses"]) == (2 * 21, 21)
    stored = json.loads(objects(bucket, f"{BUCKET}/nightly/team")["raymerge_manifest.json"])
    assert stored["submission_id"] == third["submission_id"]
