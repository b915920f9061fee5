"""A unit that runs out of GPU memory is merged again on its node's CPU; one that runs out of
memory there too stops the merge as a fault (exit 3), its finished units kept, and the rerun
resumes to the bytes of an undisturbed run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import file_digests, write_recipe

from raymerge import execute
from raymerge.merge import _job, prepare
from raymerge.recipe import recipe_from_dict


@pytest.fixture
def prepared(float32_family):
    return prepare(recipe_from_dict({"base": str(float32_family["base"]),
                                     "sources": [str(s) for s in float32_family["sources"][:2]],
                                     "method": {"name": "ties", "density": 0.5}}))


def test_a_unit_out_of_gpu_memory_is_merged_again_on_the_cpu(prepared, monkeypatch):
    unit = prepared.plan.units[1]
    on_cpu = execute.merge_unit(_job(prepared), unit)
    merge_on = execute._merge_unit_on

    def no_gpu_memory(job, unit):
        if job.device != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. @ " + unit.tensors[0].name)
        return merge_on(job, unit)

    monkeypatch.setattr(execute, "_merge_unit_on", no_gpu_memory)
    from dataclasses import replace

    stats, payload = execute.merge_unit(replace(_job(prepared), device="cuda"), unit)
    assert unit.tensors[0].name in stats["retried_on_cpu"]
    assert payload["tensors"].keys() == on_cpu[1]["tensors"].keys()
    for name, values in on_cpu[1]["tensors"].items():
        assert (payload["tensors"][name] == values).all(), name


def test_out_of_memory_on_the_cpu_too_is_a_fault_naming_the_unit(prepared, monkeypatch):
    unit = prepared.plan.units[1]

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("out of memory @ " + unit.tensors[0].name)

    monkeypatch.setattr(execute, "_merge_tensor", no_memory)
    with pytest.raises(execute.UnitOutOfMemoryError, match=f"unit {unit.name}: out of memory "
                                                           f"on tensor {unit.tensors[0].name}"):
        execute.merge_unit(_job(prepared), unit)
    assert execute.UnitOutOfMemoryError.exit_status == 3


def test_an_injected_out_of_memory_keeps_the_staging_and_resumes(ray_cluster, float32_family,
                                                                 tmp_path):
    """Through `raymerge merge` on its own private cluster (the injection is in the workers'
    environment): exit 3, the staging kept; the rerun resumes to the undisturbed bytes."""
    recipe = {"base": str(float32_family["base"]),
              "sources": [str(s) for s in float32_family["sources"][:2]],
              "method": {"name": "ties", "density": 0.5}, "runtime": {"max_in_flight": 1}}
    write_recipe(tmp_path / "oom.yaml", {**recipe, "output": {"path": str(tmp_path / "oom")}})
    write_recipe(tmp_path / "clean.yaml", {**recipe, "output": {"path": str(tmp_path / "clean")}})
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    merge = [sys.executable, "-m", "raymerge.cli", "merge", "--no-progress"]
    failed = subprocess.run([*merge, str(tmp_path / "oom.yaml")], capture_output=True,
                            text=True, timeout=240,
                            env={**env, "RAYMERGE_INJECT_OOM": "model.layers.1:cpu"})
    assert failed.returncode == 3, failed.stderr[-2000:]
    error = failed.stderr.strip().splitlines()
    assert len(error) == 1 and "unit model.layers.1: out of memory" in error[0]
    assert "finished units are kept" in error[0] and not (tmp_path / "oom").exists()
    assert list(tmp_path.glob(".oom*"))
    resumed = subprocess.run([*merge, str(tmp_path / "oom.yaml")], capture_output=True,
                             text=True, timeout=240, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    from raymerge.cli import main

    assert main(["merge", str(tmp_path / "clean.yaml"), "--no-progress"]) == 0
    assert file_digests(tmp_path / "oom") == file_digests(tmp_path / "clean")
