"""A merge on a 2-node Ray cluster (ray.cluster_utils.Cluster, in its own process) uses both
nodes, writes on the driver's node, and equals the single-process merge."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from helpers import load_tensors, write_recipe

from raymerge.cli import main

# argv: recipe, then "lose-worker" to remove the worker node once the first unit is written
_TWO_NODES = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from raymerge.merge import MergeProgress, prepare, run_merge
from raymerge.recipe import load_recipe

cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "object_store_memory": 100 * 2**20, "include_dashboard": False})
worker = cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
advance, removed = MergeProgress.advance, []
def advance_then_remove(self, stats):
    advance(self, stats)
    if not removed:
        cluster.remove_node(worker, allow_graceful=False)
        removed.append(stats["node"])
if sys.argv[2:] == ["lose-worker"]:
    MergeProgress.advance = advance_then_remove
try:
    result = run_merge(prepare(load_recipe(sys.argv[1])), address=cluster.address,
                       show_progress=False)
    print(json.dumps({**result.summary, "removed": len(removed)}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_merge_on_two_nodes_uses_both_and_matches(ray_cluster, float32_family, tmp_path):
    recipe = {
        "base": str(float32_family["base"]),
        "sources": [str(p) for p in float32_family["sources"]],
        "method": {"name": "ties", "density": 0.5},
        "runtime": {"num_cpus": 1, "max_in_flight": 4},
    }
    two_nodes = tmp_path / "two-nodes"
    path = write_recipe(tmp_path / "cluster.yaml", {**recipe, "output": {"path": str(two_nodes)}})
    run = subprocess.run([sys.executable, "-c", _TWO_NODES, str(path)], capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["nodes"] == 2

    local = tmp_path / "local"
    write_recipe(tmp_path / "local.yaml", {**recipe, "output": {"path": str(local)}})
    assert main(["merge", str(tmp_path / "local.yaml"), "--no-progress"]) == 0
    merged, expected = load_tensors(two_nodes), load_tensors(local)
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[name], expected[name]) for name in expected)
    shards = sorted(p.name for p in two_nodes.glob("*.safetensors"))
    assert [(two_nodes / s).read_bytes() for s in shards] == \
        [(local / s).read_bytes() for s in shards]


def test_a_worker_node_lost_mid_merge_still_finishes(ray_cluster, float32_family, tmp_path):
    recipe = {
        "base": str(float32_family["base"]),
        "sources": [str(p) for p in float32_family["sources"]],
        "method": {"name": "axis", "k": 6},
        "runtime": {"num_cpus": 1, "max_in_flight": 4},
    }
    survived = tmp_path / "survived"
    path = write_recipe(tmp_path / "lost.yaml", {**recipe, "output": {"path": str(survived)}})
    run = subprocess.run([sys.executable, "-c", _TWO_NODES, str(path), "lose-worker"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["removed"] == 1

    local = tmp_path / "local"
    write_recipe(tmp_path / "local.yaml", {**recipe, "output": {"path": str(local)}})
    assert main(["merge", str(tmp_path / "local.yaml"), "--no-progress"]) == 0
    shards = sorted(p.name for p in local.glob("*.safetensors"))
    assert [(survived / s).read_bytes() for s in shards] == \
        [(local / s).read_bytes() for s in shards]
