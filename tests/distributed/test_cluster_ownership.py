"""Which cluster a merge uses, with other Ray work on the machine: concurrent merges with no
cluster and with a `ray start` cluster, addresses that do not answer, a stale `ray start`
record, a cluster stopped mid-merge, and jobs that can never be scheduled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import file_digests, published, write_recipe
from ray_clusters import HeadNode, free_ports, short_temp_dir, stop_process_tree

from raymerge.cli import main
from raymerge.output.progress_log import PROGRESS_NAME

METHODS = {
    "ties": {"method": {"name": "ties", "density": 0.5}},
    "axis-svc": {"method": {"name": "axis", "k": 6}, "calibrate": {"svc": {"alpha": "auto"}}},
    "dare": {"method": {"name": "dare", "p": 0.5, "seed": 3}},
}


def recipe_for(root: Path, family: dict, name: str, out: Path, **extra) -> Path:
    return write_recipe(root / f"recipe-{name}-{out.name}.yaml", {
        "base": str(family["base"]), "sources": [str(p) for p in family["sources"]],
        **METHODS[name], "output": {"path": str(out)}, **extra})


@pytest.fixture(scope="module")
def solo_runs(ray_cluster, float32_family, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Each recipe merged alone, in this process on the session's cluster."""
    root = tmp_path_factory.mktemp("solo")
    digests = {}
    for name in METHODS:
        out = root / name
        assert main(["merge", str(recipe_for(root, float32_family, name, out)),
                     "--no-progress"]) == 0
        digests[name] = file_digests(out)
    return digests


@pytest.fixture
def ray_tmpdir():
    """A RAY_TMPDIR of this test's own: the `ray start` record and private clusters live there."""
    directory = short_temp_dir()
    yield directory
    import shutil

    shutil.rmtree(directory, ignore_errors=True)


def merge_command(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "raymerge.cli", "merge", str(recipe), "--no-progress", "--json",
            *extra]


def subprocess_env(ray_tmpdir: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return {**env, "RAY_TMPDIR": ray_tmpdir, "RAY_AUTH_MODE": "disabled", **extra}


def run_together(commands: list[list[str]], env: dict) -> list[subprocess.CompletedProcess]:
    """Start every command at once; wait for all."""
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for command in commands]
    results = []
    for command, process in zip(commands, processes):
        stdout, stderr = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return results


def last_record(run: subprocess.CompletedProcess) -> dict:
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_three_merges_at_once_without_a_cluster_each_start_their_own(
        float32_family, solo_runs, tmp_path, ray_tmpdir):
    # A stale record of a stopped `ray start` cluster: passed over, not waited on.
    (Path(ray_tmpdir) / "ray").mkdir()
    stale = f"127.0.0.1:{free_ports(1)[0]}"
    (Path(ray_tmpdir) / "ray" / "ray_current_cluster").write_text(stale)
    outs = {name: tmp_path / name for name in METHODS}
    runs = run_together([merge_command(recipe_for(tmp_path, float32_family, name, out))
                         for name, out in outs.items()], subprocess_env(ray_tmpdir))
    records = [last_record(run) for run in runs]
    assert all(record["private_cluster"] for record in records)
    assert len({record["cluster"] for record in records}) == 3  # none attached to another's
    for run in runs:
        assert f"the Ray cluster `ray start` recorded at {stale} does not answer" in run.stderr
    for name, out in outs.items():
        assert file_digests(out) == solo_runs[name], name


def test_three_merges_at_once_share_a_ray_start_cluster(float32_family, solo_runs, tmp_path,
                                                       ray_tmpdir):
    outs = {name: tmp_path / name for name in METHODS}
    with HeadNode(ray_tmpdir=ray_tmpdir) as head:
        runs = run_together([merge_command(recipe_for(tmp_path, float32_family, name, out))
                             for name, out in outs.items()], subprocess_env(ray_tmpdir))
    records = [last_record(run) for run in runs]
    assert [record["cluster"] for record in records] == [head.address] * 3
    assert not any(record["private_cluster"] for record in records)
    for name, out in outs.items():
        assert file_digests(out) == solo_runs[name], name


@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS"])
def test_an_address_that_does_not_answer_fails_fast_in_one_line(float32_family, tmp_path,
                                                               ray_tmpdir, how):
    nobody = f"127.0.0.1:{free_ports(1)[0]}"
    out = tmp_path / "merged"
    recipe = recipe_for(tmp_path, float32_family, "ties", out)
    extra, env = (["--address", nobody], {}) if how == "--address" else ([], {"RAY_ADDRESS":
                                                                             nobody})
    started = time.monotonic()
    run = subprocess.run(merge_command(recipe, *extra), env=subprocess_env(ray_tmpdir, **env),
                         capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert run.returncode == 2 and elapsed < 30, (elapsed, run.stderr[-2000:])
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"no Ray cluster answers at {nobody} ({how})" in lines[0]
    assert "ray start --head" in lines[0]
    assert json.loads(run.stdout.strip().splitlines()[-1])["status"] == "error"
    assert published(out) == []


def test_a_dashboard_url_as_address_says_what_to_give(float32_family, tmp_path, ray_tmpdir):
    recipe = recipe_for(tmp_path, float32_family, "ties", tmp_path / "merged")
    run = subprocess.run(merge_command(recipe, "--address", "http://127.0.0.1:8265"),
                         env=subprocess_env(ray_tmpdir), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert "is a dashboard URL" in run.stderr and "GCS address" in run.stderr


# The driver stops its own cluster (the `ray start` process the test started, and everything
# under it) once two units are written, as when the head is stopped or its node dies.
_STOPS_ITS_CLUSTER = r"""
import sys
from ray_clusters import stop_process_tree
from raymerge.cli import main
from raymerge.merge import MergeProgress

advance, done = MergeProgress.advance, []
def advance_then_stop_the_cluster(self, stats):
    advance(self, stats)
    done.append(stats)
    if len(done) == 2:
        stop_process_tree(int(sys.argv[3]))
MergeProgress.advance = advance_then_stop_the_cluster
sys.exit(main(["merge", sys.argv[1], "--address", sys.argv[2], "--no-progress"]))
"""


def test_a_cluster_stopped_mid_merge_is_one_line_and_the_rerun_resumes(
        ray_cluster, float32_family, solo_runs, tmp_path, ray_tmpdir):
    out = tmp_path / "axis-svc"
    recipe = recipe_for(tmp_path, float32_family, "axis-svc", out, runtime={"max_in_flight": 1})
    env = subprocess_env(ray_tmpdir, PYTHONPATH=str(Path(__file__).parents[1]))
    with HeadNode(ray_tmpdir=ray_tmpdir) as head:
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-c", _STOPS_ITS_CLUSTER, str(recipe), head.address,
                              str(head.process.pid)], env=env, capture_output=True, text=True,
                             timeout=240)
        elapsed = time.monotonic() - started
    assert run.returncode == 3, run.stderr[-3000:]
    assert elapsed < 60, elapsed  # Ray alone would wait a minute, then end the process
    ours = [line for line in run.stderr.splitlines() if line.startswith("raymerge:")]
    assert len(ours) == 1 and ours[0] == run.stderr.strip().splitlines()[-1]
    assert f"the Ray cluster at {head.address} was lost" in ours[0]
    assert "rerun the same command to resume" in ours[0]
    staging = tmp_path / ".axis-svc.raymerge-staging"
    assert not out.exists() and (staging / PROGRESS_NAME).exists()

    assert main(["merge", str(recipe), "--no-progress"]) == 0  # on the session's cluster
    assert file_digests(out) == solo_runs["axis-svc"]
    assert published(out) == ["axis-svc"]


def test_a_merge_task_no_node_can_hold_fails_at_once(ray_cluster, float32_family, tmp_path,
                                                     capsys):
    out = tmp_path / "merged"
    recipe = recipe_for(tmp_path, float32_family, "ties", out, runtime={"num_gpus": 1})
    started = time.monotonic()
    assert main(["merge", str(recipe), "--no-progress"]) == 2
    assert time.monotonic() - started < 30
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "a merge task cannot be scheduled" in error and "1 GPU" in error
    assert "runtime.num_gpus" in error and published(out) == []


def test_stop_process_tree_stops_only_the_tree():
    """The helper the tests stop clusters with signals a process and its descendants only."""
    import psutil

    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    outsider = subprocess.Popen(sleep)
    tree = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             f"subprocess.Popen({sleep!r}); time.sleep(60)"])
    deadline = time.monotonic() + 20
    while not psutil.Process(tree.pid).children() and time.monotonic() < deadline:
        time.sleep(0.1)
    [grandchild] = psutil.Process(tree.pid).children()
    stop_process_tree(tree.pid, grace_s=5)
    assert tree.wait(timeout=10) is not None
    assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE
    assert outsider.poll() is None
    outsider.kill()
    outsider.wait()
