"""`ray job submit` of the merge pipeline to a cluster started with `ray start --head`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from helpers import load_tensors, write_recipe

REPO = Path(__file__).parents[2]


def _free_ports(count: int) -> list[int]:
    """Distinct ports free now (all held open together while they are picked)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def test_ray_job_submit_runs_the_merge_pipeline(float32_family, tmp_path):
    ray_cli = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    port, dashboard, *agent_ports = _free_ports(7)
    # short: Ray's Unix sockets live under it and socket paths are limited to ~107 bytes
    temp_dir = tempfile.mkdtemp(prefix="rm-", dir="/tmp")
    start = [ray_cli, "start", "--head", "--num-cpus", "2", "--disable-usage-stats",
             f"--port={port}", f"--dashboard-port={dashboard}", "--include-dashboard=true",
             # every port of its own: the test session's cluster holds the default ones
             *(f"--{name}={number}" for name, number in zip(
                 ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                  "runtime-env-agent-port", "ray-client-server-port", "metrics-export-port"),
                 agent_ports)),
             f"--temp-dir={temp_dir}"]
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(float32_family["base"]),
        "sources": [str(p) for p in float32_family["sources"][:2]],
        "method": {"name": "ties", "density": 0.5}, "output": {"path": str(out)}})
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
        for _ in range(12):  # the head's job agent may come up a few seconds after `ray start`
            submit = subprocess.run(
                [ray_cli, "job", "submit", f"--address=http://127.0.0.1:{dashboard}",
                 "--working-dir", str(REPO), "--", sys.executable, "-m", "pipelines.merge",
                 str(recipe)],
                env=env, capture_output=True, text=True, timeout=300)
            if "No available agent to submit job" not in submit.stderr:
                break
            time.sleep(5)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        record = json.loads(next(line for line in reversed(submit.stdout.splitlines())
                                 if line.startswith('{"status"')))
        assert record["status"] == "ok" and record["output"] == str(out.resolve())
        merged, base = load_tensors(out), load_tensors(float32_family["base"])
        assert merged.keys() == base.keys()
        assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"],
                               base["model.layers.0.mlp.up_proj.weight"])
    finally:
        _stop_cluster_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_cluster_under(temp_dir: str) -> None:
    """Stop only this cluster (every process whose command line names its temp dir, and their
    children); `ray stop` would also stop the test session's own cluster."""
    members = []
    for process in psutil.process_iter(["cmdline"]):
        if temp_dir in " ".join(process.info["cmdline"] or []):
            try:
                members += [process, *process.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
    for process in members:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(members, timeout=15)
    for process in alive:
        process.kill()
