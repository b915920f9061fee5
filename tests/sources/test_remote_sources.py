"""Sources and base in object storage (a real S3 server, SeaweedFS) and on the Hub (a local
server speaking its protocol): the driver reads metadata only, tasks read their tensors' byte
ranges, and the merges equal the same merges from local directories."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_tensors, manifest, write_recipe
from servers.hub import use_hub
from test_lora import write_lora

from raymerge.cli import main
from raymerge.merge import prepare
from raymerge.recipe import load_recipe

BUCKET = "models"


def data_start(file: Path) -> int:
    """Where a safetensors file's tensor bytes begin (after its header)."""
    with open(file, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


@pytest.fixture(scope="module")
def in_s3(s3_server, float32_family, tmp_path_factory) -> dict:
    """The float32 family's base, three fine-tunes and a LoRA adapter, uploaded to S3."""
    adapter = tmp_path_factory.mktemp("adapter") / "lora"
    write_lora(adapter, float32_family["base"], seed=7)
    local = {"base": Path(float32_family["base"]),
             **{f"ft-{i}": Path(float32_family["sources"][i]) for i in range(3)},
             "lora": adapter}
    for name, directory in local.items():
        s3_server.upload_directory(directory, f"{BUCKET}/family/{name}")
    return {"local": local, "uri": {name: f"s3://{BUCKET}/family/{name}" for name in local},
            "storage": {"endpoint": s3_server.endpoint_url}}


def recipe_pair(in_s3: dict, tmp_path: Path, names: list[str], extra: dict) -> tuple[Path, Path]:
    """The same recipe twice: from S3, and from the local directories."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = []
    for where in ("uri", "local"):
        recipe = {"base": str(in_s3[where]["base"]),
                  "sources": [str(in_s3[where][name]) for name in names],
                  "output": {"path": str(tmp_path / f"out-{where}")}, **extra}
        if where == "uri":
            recipe["storage"] = in_s3["storage"]
        paths.append(write_recipe(tmp_path / f"{where}.yaml", recipe))
    return paths[0], paths[1]


def assert_same_tensors(left: Path, right: Path) -> None:
    merged, expected = load_tensors(left), load_tensors(right)
    assert merged.keys() == expected.keys()
    for name in expected:
        assert torch.equal(merged[name], expected[name]), name


def test_the_driver_reads_only_metadata(in_s3, s3_recorder, tmp_path):
    s3_recipe, _ = recipe_pair(in_s3, tmp_path, ["ft-0", "ft-1", "lora"], {})
    recipe = load_recipe(s3_recipe)
    recipe.storage.endpoint = s3_recorder.endpoint_url
    prepared = prepare(recipe)
    assert prepared.base.remote and len(prepared.plan.units) > 1
    weights = 0
    for request in s3_recorder.requests:
        if request.method != "GET" or not request.path.endswith(".safetensors"):
            continue
        key = request.path.split(f"/{BUCKET}/family/", 1)[1]
        first = data_start(in_s3["local"][key.split("/")[0]] / key.split("/", 1)[1])
        assert request.range, request  # never a whole weight file
        end = int(request.range.removeprefix("bytes=").split("-")[1])
        assert end < first, f"{request.path} {request.range}: a weight byte"
        weights += 1
    assert weights >= 3  # the headers were read by range


@pytest.mark.parametrize("where, expected", [
    ("s3://no-such-bucket/base", "no-such-bucket"),
    ("s3://models/family/nothing-here", "nothing there"),
])
def test_a_bad_uri_is_one_line(in_s3, tmp_path, capsys, where, expected):
    recipe = write_recipe(tmp_path / "bad.yaml", {
        "base": where, "sources": [in_s3["uri"]["ft-0"]], "storage": in_s3["storage"],
        "output": {"path": str(tmp_path / "out")}})
    assert main(["merge", str(recipe), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and expected in error and where in error
    assert not (tmp_path / "out").exists()


def test_a_wrong_secret_is_one_line_that_does_not_show_it(in_s3, tmp_path, capsys,
                                                          monkeypatch):
    secret = "wrong-secret-RECOGNISABLE-1234"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    from raymerge.store import objects

    objects._filesystem.cache_clear()
    recipe = write_recipe(tmp_path / "bad.yaml", {
        "base": in_s3["uri"]["base"], "sources": [in_s3["uri"]["ft-0"]],
        "storage": in_s3["storage"], "output": {"path": str(tmp_path / "out")}})
    try:
        assert main(["merge", str(recipe), "--no-progress"]) == 2
    finally:
        objects._filesystem.cache_clear()
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and in_s3["uri"]["base"] in error
    assert secret not in error and "credentials" in error


# argv: recipes. A 2-node cluster whose nodes share nothing but S3: each merge's summary.
_TWO_NODES = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from raymerge.merge import prepare, run_merge
from raymerge.recipe import load_recipe

cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "object_store_memory": 100 * 2**20, "include_dashboard": False})
cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
try:
    for recipe in sys.argv[1:]:
        result = run_merge(prepare(load_recipe(recipe)), address=cluster.address,
                           show_progress=False)
        print(json.dumps(result.summary))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_two_nodes_that_share_only_s3(ray_cluster, in_s3, tmp_path):
    """TIES with a LoRA adapter, and AXIS+SVC with the node-local source cache, from S3 on two
    nodes: equal to the merges of the local directories; every node fetched its own ranges,
    TIES (one pass) and AXIS+SVC (two passes, the second from the cache) each byte once."""
    cache = tmp_path / "node-cache"
    ties = recipe_pair(in_s3, tmp_path / "ties", ["ft-0", "ft-1", "lora"], {
        "method": {"name": "ties", "density": 0.5}})
    axis = recipe_pair(in_s3, tmp_path / "axis", ["ft-0", "ft-1", "ft-2"], {
        "method": {"name": "axis", "k": 6}, "calibrate": {"svc": {"alpha": "auto"}},
        "runtime": {"source_cache": str(cache)}})
    run = subprocess.run([sys.executable, "-c", _TWO_NODES, str(ties[0]), str(axis[0])],
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    summaries = [json.loads(line) for line in run.stdout.strip().splitlines()[-2:]]
    for (s3_recipe, local_recipe), summary in zip((ties, axis), summaries):
        assert summary["nodes"] == 2
        fetched = summary["fetched_bytes_by_node"]
        assert len(fetched) == 2 and all(value > 0 for value in fetched.values())
        prepared = prepare(load_recipe(s3_recipe))
        every_byte_once = prepared.base.nbytes + sum(
            s.nbytes for s in prepared.sources if not hasattr(s, "targets"))  # adapters apart
        assert sum(fetched.values()) == every_byte_once
        assert main(["merge", str(local_recipe), "--no-progress"]) == 0
        assert_same_tensors(s3_recipe.parent / "out-uri", local_recipe.parent / "out-local")
    assert summaries[1]["read_bytes"] > prepared.base.nbytes + sum(
        s.nbytes for s in prepared.sources)  # AXIS+SVC read the sources twice...
    assert not any(cache.iterdir())  # ...the second time from each unit's cache, now gone
    source = manifest(axis[0].parent / "out-uri")["sources"][0]
    assert source["directory"] is None and all(
        "etag" in facts or "version" in facts for facts in source["files"].values())


def test_a_hub_repo_read_by_range(ray_cluster, hub_server, float32_family, monkeypatch,
                                  tmp_path):
    use_hub(monkeypatch, hub_server, cache_dir=tmp_path / "hf")
    commit = hub_server.add_repo("org/ft-math", Path(float32_family["sources"][0]),
                                 lfs_min_bytes=0)
    hub_server.clear_requests()
    recipe = {"base": str(float32_family["base"]), "method": {"name": "ties", "density": 0.5}}
    write_recipe(tmp_path / "hub.yaml", {**recipe, "sources": ["hf://org/ft-math@main"],
                                          "output": {"path": str(tmp_path / "out-hub")}})
    write_recipe(tmp_path / "local.yaml", {**recipe, "sources": [str(float32_family["sources"][0])],
                                            "output": {"path": str(tmp_path / "out-local")}})
    assert main(["merge", str(tmp_path / "hub.yaml"), "--no-progress"]) == 0
    assert main(["merge", str(tmp_path / "local.yaml"), "--no-progress"]) == 0
    assert_same_tensors(tmp_path / "out-hub", tmp_path / "out-local")
    source = manifest(tmp_path / "out-hub")["sources"][0]
    assert source["revision"] == commit
    weights = Path(float32_family["sources"][0]) / "model.safetensors"
    import hashlib

    assert source["files"]["model.safetensors"]["sha256"] == \
        hashlib.sha256(weights.read_bytes()).hexdigest()
    reads = [r for r in hub_server.requests if r.path.endswith("model.safetensors") or r.cdn]
    assert reads and all(r.range for r in reads if r.method == "GET")


def test_a_store_that_goes_away_mid_merge_keeps_the_staging_and_resumes(
        ray_cluster, in_s3, s3_server, tmp_path, monkeypatch, capsys):
    from raymerge.progress import MergeProgress

    s3_recipe, local_recipe = recipe_pair(in_s3, tmp_path, ["ft-0", "ft-1"], {
        "method": {"name": "task_arithmetic"}, "runtime": {"max_in_flight": 1}})
    data = yaml_load(s3_recipe)
    data["storage"]["retries"] = 2  # give up quickly
    write_recipe(s3_recipe, data)
    advance, stopped = MergeProgress.advance, []

    def advance_then_stop(self, stats):
        advance(self, stats)
        if not stopped:
            s3_server.stop()
            stopped.append(stats["unit"])

    monkeypatch.setattr(MergeProgress, "advance", advance_then_stop)
    try:
        assert main(["merge", str(s3_recipe), "--no-progress"]) == 3
    finally:
        s3_server.start()
    error = capsys.readouterr().err.strip()
    assert "did not answer" in error and "rerun the same command to resume" in error
    assert len(error.splitlines()) == 1 and not (tmp_path / "out-uri").exists()
    assert list(tmp_path.glob(".out-uri*"))  # the staging directory is kept
    monkeypatch.setattr(MergeProgress, "advance", advance)
    assert main(["merge", str(s3_recipe), "--no-progress"]) == 0
    assert manifest(tmp_path / "out-uri")["summary"]["resumed_units"] >= 1
    assert main(["merge", str(local_recipe), "--no-progress"]) == 0
    shards = sorted(p.name for p in (tmp_path / "out-local").glob("*.safetensors"))
    assert [(tmp_path / "out-uri" / s).read_bytes() for s in shards] == \
        [(tmp_path / "out-local" / s).read_bytes() for s in shards]


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_a_wrong_endpoint_is_one_line_before_any_work(in_s3, tmp_path, capsys):
    from ray_clusters import free_ports

    closed = f"http://127.0.0.1:{free_ports(1, '127.0.0.1')[0]}"
    recipe = write_recipe(tmp_path / "bad.yaml", {
        "base": in_s3["uri"]["base"], "sources": [in_s3["uri"]["ft-0"]],
        "storage": {"endpoint": closed, "retries": 1}, "output": {"path": str(tmp_path / "out")}})
    assert main(["merge", str(recipe), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and in_s3["uri"]["base"] in error
    assert "check storage.endpoint" in error and not (tmp_path / "out").exists()
