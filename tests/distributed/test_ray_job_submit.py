"""`ray job submit` of the merge pipeline to a cluster started with `ray start --head`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from helpers import load_tensors, write_recipe
from ray_clusters import RAY_CLI, HeadNode

REPO = Path(__file__).parents[2]


def test_ray_job_submit_runs_the_merge_pipeline(float32_family, tmp_path):
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(float32_family["base"]),
        "sources": [str(p) for p in float32_family["sources"][:2]],
        "method": {"name": "ties", "density": 0.5}, "output": {"path": str(out)}})
    with HeadNode(dashboard=True) as head:
        for _ in range(12):  # the head's job agent may come up a few seconds after `ray start`
            submit = subprocess.run(
                [RAY_CLI, "job", "submit", f"--address=http://127.0.0.1:{head.dashboard_port}",
                 "--working-dir", str(REPO), "--", sys.executable, "-m", "pipelines.merge",
                 str(recipe)],
                env=head.env, capture_output=True, text=True, timeout=300)
            if "No available agent to submit job" not in submit.stderr:
                break
            time.sleep(5)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    record = json.loads(next(line for line in reversed(submit.stdout.splitlines())
                             if line.startswith('{"status"')))
    assert record["status"] == "ok" and record["output"] == str(out.resolve())
    assert record["cluster"] == head.address and not record["private_cluster"]  # the job's own
    merged, base = load_tensors(out), load_tensors(float32_family["base"])
    assert merged.keys() == base.keys()
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"],
                           base["model.layers.0.mlp.up_proj.weight"])
