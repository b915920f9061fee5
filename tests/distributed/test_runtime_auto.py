"""num_gpus and max_in_flight `auto` (the defaults), resolved against the cluster's nodes: one GPU
per task where there are GPUs, as many tasks at once as the nodes have slots for."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import manifest, write_recipe

from raymerge.cli import main
from raymerge.distributed.resources import resolve_runtime
from raymerge.recipe import RuntimeSpec

GiB = float(2**30)


def test_auto_on_cpu_nodes_fills_their_cpus_bounded_by_memory():
    nodes = [{"CPU": 2.0, "GPU": 0.0, "memory": 24 * GiB}, {"CPU": 8.0, "memory": 4 * GiB}]
    runtime = resolve_runtime(RuntimeSpec(), nodes, task_bytes=int(1 * GiB))
    assert (runtime.num_gpus, runtime.max_in_flight) == (0.0, 2 + 4 + 1)  # 4 GiB / 1 GiB, +1
    runtime = resolve_runtime(RuntimeSpec(num_cpus=2), nodes, task_bytes=int(30 * GiB))
    assert runtime.max_in_flight == 1 + 1  # no node holds one task's estimate: still one


def test_auto_on_gpu_nodes_takes_one_gpu_per_task_and_fills_them():
    nodes = [{"CPU": 32.0, "GPU": 8.0, "memory": 512 * GiB}] * 2
    runtime = resolve_runtime(RuntimeSpec(), nodes, task_bytes=int(10 * GiB))
    assert (runtime.num_gpus, runtime.max_in_flight) == (1.0, 16 + 1)
    quarter = resolve_runtime(RuntimeSpec(num_gpus=0.25, memory="8GB"), nodes, task_bytes=1)
    assert quarter.max_in_flight == 2 * 32 + 1  # 32 quarter-GPUs a node, and 32 CPUs
    explicit = resolve_runtime(RuntimeSpec(num_gpus=0, max_in_flight=3), nodes, task_bytes=1)
    assert (explicit.num_gpus, explicit.max_in_flight) == (0, 3)


def test_a_merge_on_the_cpu_cluster_reports_what_auto_took(ray_cluster, float32_family,
                                                             tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(float32_family["base"]), "sources": [str(float32_family["sources"][0])],
        "output": {"path": str(tmp_path / "out")}})
    assert main(["plan", str(recipe)]) == 0
    assert "num_gpus auto (1 per task where the cluster has GPUs" in capsys.readouterr().out
    assert main(["merge", str(recipe), "--no-progress"]) == 0
    assert "tasks                on cpu, 0 GPU each, 3 at a time" in capsys.readouterr().out
    summary = manifest(tmp_path / "out")["summary"]
    assert (summary["num_gpus"], summary["max_in_flight"], summary["device"]) == (0, 3, "cpu")


# argv: recipe. One node that advertises a GPU (the tasks run on its CPU: device cpu).
_GPU_NODE = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from raymerge.merge import prepare, run_merge
from raymerge.recipe import load_recipe

cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 2, "num_gpus": 1, "object_store_memory": 100 * 2**20, "include_dashboard": False})
try:
    result = run_merge(prepare(load_recipe(sys.argv[1])), address=cluster.address,
                       show_progress=False)
    print(json.dumps(result.summary))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_a_node_with_a_gpu_gets_one_task_per_gpu(ray_cluster, float32_family, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(float32_family["base"]),
        "sources": [str(s) for s in float32_family["sources"][:2]],
        "runtime": {"device": "cpu"}, "output": {"path": str(tmp_path / "out")}})
    run = subprocess.run([sys.executable, "-c", _GPU_NODE, str(recipe)], capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert (summary["num_gpus"], summary["max_in_flight"], summary["device"]) == (1.0, 2, "cpu")


def test_a_unit_larger_than_a_tasks_share_of_the_gpu_is_refused_in_one_line(float32_family):
    import re

    import pytest

    from raymerge.distributed.resources import check_device_memory
    from raymerge.errors import ClusterError
    from raymerge.merge import prepare
    from raymerge.recipe import recipe_from_dict

    plan = prepare(recipe_from_dict({"base": str(float32_family["base"]),
                                     "sources": [str(float32_family["sources"][0])]})).plan
    largest = max(plan.units, key=lambda unit: unit.device_peak_bytes)
    assert largest.device_peak_bytes == largest.peak_bytes  # task arithmetic takes no SVD
    check_device_memory(plan.units, largest.device_peak_bytes, 1)  # fits exactly
    with pytest.raises(ClusterError, match=f"unit {re.escape(largest.name)} needs about .* of GPU "
                                           r"memory .*\(0.25 of a GPU\); raise runtime.num_gpus"):
        check_device_memory(plan.units, largest.device_peak_bytes - 1, 0.25)


def test_the_device_plan_of_a_spectral_merge_holds_an_exact_svds_workspace(float32_family):
    import pytest

    from raymerge.distributed.resources import check_device_memory
    from raymerge.errors import ClusterError
    from raymerge.merge import prepare
    from raymerge.plan import svd_workspace_bytes
    from raymerge.recipe import recipe_from_dict

    def plan(method, **extra):
        return prepare(recipe_from_dict({"base": str(float32_family["base"]),
                                         "sources": [str(s) for s in float32_family["sources"]],
                                         "method": {"name": method}, **extra})).plan

    # 3×5: the input's copy (15), U (3×3), Vᵀ (3×5) and 4·3² floats of workspace
    assert svd_workspace_bytes((3, 5), 4) == 4 * (15 + 9 + 15 + 36)
    assert svd_workspace_bytes((7,), 4) == 0  # a vector: no SVD
    plain, axis = plan("task_arithmetic"), plan("axis")
    svc = plan("ties", calibrate={"svc": {"alpha": "auto"}})
    unit = max(axis.units, key=lambda unit: unit.device_peak_bytes)
    workspace = max(svd_workspace_bytes(t.shape, 4) for t in unit.tensors)
    assert workspace > 0 and unit.device_peak_bytes == unit.peak_bytes + workspace
    assert all(u.device_peak_bytes == u.peak_bytes for u in plain.units)
    assert any(u.device_peak_bytes > u.peak_bytes for u in svc.units)  # SVC takes SVDs
    from raymerge.progress import format_plan
    from raymerge.sizes import format_size

    assert f"on a GPU, with an exact SVD's workspace ≈ {format_size(axis.device_peak_bytes)}" \
        in format_plan(axis)
    assert "on a GPU" not in format_plan(plain)
    with pytest.raises(ClusterError, match=r"with an exact SVD's workspace of .*\(a whole GPU\)"):
        check_device_memory(axis.units, unit.device_peak_bytes - 1, 1)
