"""Faults a long unattended merge meets: its driver, its writer or a task's worker killed, a
source file cut short or deleted mid-merge, a full output disk. Either the merge finishes with
the bytes of an undisturbed run, or it fails in one line and publishes nothing."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import file_digests, published, write_recipe

from raymerge.cli import main
from raymerge.errors import OutputError
from raymerge.merge import MergeProgress
from raymerge.output.progress_log import PROGRESS_NAME


def axis_recipe(tmp_path: Path, family: dict, out: Path, max_in_flight: int = 1,
                sources: list | None = None) -> Path:
    return write_recipe(tmp_path / f"recipe-{out.name}.yaml", {
        "base": str(family["base"]),
        "sources": [str(p) for p in (sources or family["sources"])],
        "method": {"name": "axis", "k": 6}, "calibrate": {"svc": {"alpha": "auto"}},
        "output": {"path": str(out)}, "runtime": {"max_in_flight": max_in_flight}})


@pytest.fixture(scope="module")
def clean_run(ray_cluster, float32_family, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("clean")
    out = root / "merged"
    assert main(["merge", str(axis_recipe(root, float32_family, out)), "--no-progress"]) == 0
    return file_digests(out)


def on_unit_done(monkeypatch, action) -> list:
    """Call action(units_done) in the driver each time a unit is written; returns its results."""
    results, advance = [], MergeProgress.advance

    def advance_and_act(self, stats):
        advance(self, stats)
        results.append(action(len(results) + 1))

    monkeypatch.setattr(MergeProgress, "advance", advance_and_act)
    return results


def kill_processes(title: str) -> list[int]:
    """SIGKILL the processes of this test session's own Ray cluster (descendants of this
    process: the session cluster's raylet is its child, and workers are the raylet's) whose
    title names `title`; their pids. Another merge or test run on the machine is never hit."""
    killed = []
    for process in psutil.Process().children(recursive=True):
        try:
            if any(title in part for part in process.cmdline()):
                process.send_signal(signal.SIGKILL)
                killed.append(process.pid)
        except psutil.NoSuchProcess:
            continue
    return killed


_KILLED_DRIVER = r"""
import os, signal, sys
from raymerge.cli import main
from raymerge.merge import MergeProgress

advance, done = MergeProgress.advance, []
def advance_then_die(self, stats):
    advance(self, stats)
    done.append(stats)
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs: as when a node or job dies
MergeProgress.advance = advance_then_die
sys.exit(main(["merge", sys.argv[1], "--address", sys.argv[2], "--no-progress"]))
"""


def test_a_killed_driver_is_resumed_to_identical_bytes(ray_cluster, float32_family, tmp_path,
                                                       clean_run, capsys):
    import ray

    out = tmp_path / "merged"
    recipe = axis_recipe(tmp_path, float32_family, out)
    address = ray.get_runtime_context().gcs_address
    run = subprocess.run([sys.executable, "-c", _KILLED_DRIVER, str(recipe), address],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    staging = tmp_path / ".merged.raymerge-staging"
    assert not out.exists()
    assert len((staging / PROGRESS_NAME).read_text().splitlines()) == 1 + 2  # key + 2 units

    assert main(["merge", str(recipe), "--no-progress", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["resumed_units"] == 2
    assert file_digests(out) == clean_run
    assert published(out) == ["merged"] and not (out / PROGRESS_NAME).exists()


def test_a_killed_writer_is_restarted_from_its_log(ray_cluster, float32_family, tmp_path,
                                                   clean_run, monkeypatch):
    killed = on_unit_done(monkeypatch, lambda done: kill_processes("ray::ShardWriterActor")
                          if done == 2 else [])
    out = tmp_path / "merged"
    assert main(["merge", str(axis_recipe(tmp_path, float32_family, out)), "--no-progress"]) == 0
    assert len(killed[1]) == 1  # the writer was killed once, mid-merge
    assert file_digests(out) == clean_run


def test_a_worker_killed_mid_unit_is_retried(ray_cluster, float32_family, tmp_path, clean_run,
                                             monkeypatch):
    def kill_a_running_unit(done: int) -> list[int]:
        """After each of the first 2 units: wait (≤ 2 s) for a worker running a unit, kill it.
        All 4 units are submitted at once, so the others run while the driver waits here."""
        deadline = time.monotonic() + 2
        while done <= 2 and time.monotonic() < deadline:
            if pids := kill_processes("ray::merge_unit_on_node"):
                return pids
            time.sleep(0.005)
        return []

    killed = on_unit_done(monkeypatch, kill_a_running_unit)
    out = tmp_path / "merged"
    recipe = axis_recipe(tmp_path, float32_family, out, max_in_flight=4)
    assert main(["merge", str(recipe), "--no-progress"]) == 0
    assert sum(map(len, killed)) >= 1  # at least one task's worker died while merging
    assert file_digests(out) == clean_run


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_source_damaged_mid_merge_fails_cleanly(ray_cluster, float32_family, tmp_path,
                                                  monkeypatch, capsys, damage):
    source = shutil.copytree(float32_family["sources"][0], tmp_path / "ft-copy")
    weights = source / "model.safetensors"  # one file holding every block

    def hurt(done: int) -> None:
        if done == 1 and damage == "truncate":
            os.truncate(weights, weights.stat().st_size // 2)
        elif done == 1:
            weights.unlink()

    on_unit_done(monkeypatch, hurt)
    out = tmp_path / "merged"
    recipe = axis_recipe(tmp_path, float32_family, out,
                         sources=[source, *float32_family["sources"][1:]])
    assert main(["merge", str(recipe), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"source {source}: cannot read tensor" in error
    assert "re-download it" in error
    assert published(out) == []  # neither output nor staging directory


def test_no_room_for_the_output_fails_before_merging_and_keeps_the_old_one(
        ray_cluster, float32_family, tmp_path, monkeypatch, capsys):
    out = tmp_path / "merged"
    recipe = axis_recipe(tmp_path, float32_family, out)
    assert main(["merge", str(recipe), "--no-progress"]) == 0
    before = file_digests(out)
    free = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr("raymerge.output.staging.shutil.disk_usage", lambda path: free)
    recipe = axis_recipe(tmp_path, float32_family, out, sources=float32_family["sources"][:2])
    assert main(["merge", str(recipe), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert "output merged needs" in error and "has 1000 B free" in error
    assert file_digests(out) == before and published(out) == ["merged"]


def test_a_full_disk_while_writing_is_one_clear_error(tmp_path, monkeypatch):
    from raymerge.output.layout import layout_shards
    from raymerge.output.shard_writer import ShardWriter
    from raymerge.plan import TensorTask

    layout = layout_shards([TensorTask("w", (4, 4), "F32", "F32")], 2**20)
    writer = ShardWriter(tmp_path, layout)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("raymerge.output.shard_writer.os.pwrite", full)
    with pytest.raises(OutputError, match="the disk is full while writing"):
        writer.write({"w": np.zeros((4, 4), np.float32)})


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a disk that can really fill up (needs the privilege to mount)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:  # the ENOSPC path is also covered by the ShardWriter test above
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_the_disk_filling_up_mid_merge_keeps_the_previous_output(
        ray_cluster, float32_family, tmp_path, small_disk, monkeypatch, capsys):
    out = small_disk / "merged"
    assert main(["merge", str(axis_recipe(tmp_path, float32_family, out)), "--no-progress"]) == 0
    before = file_digests(out)

    def fill_the_disk(done: int) -> None:
        if done == 1:  # another process takes all the space left
            with open(small_disk / "filler", "wb") as handle:
                try:
                    while True:
                        handle.write(b"\0" * 65536)
                        handle.flush()
                except OSError:
                    pass

    on_unit_done(monkeypatch, fill_the_disk)
    recipe = axis_recipe(tmp_path, float32_family, out, sources=float32_family["sources"][:2])
    assert main(["merge", str(recipe), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "output merged: the disk is full while" in error
    assert "a previous output there is intact" in error
    assert file_digests(out) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "merged"]
