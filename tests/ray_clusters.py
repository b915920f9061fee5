"""Ray clusters a test starts and stops itself: `ray start --head --block` as a child process,
with ports and a temp directory of its own, stopped by signalling that child and its
descendants only (never processes found by name across the machine)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY_CLI = str(Path(sys.executable).parent / "ray")
AGENT_PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                    "runtime-env-agent-port", "ray-client-server-port", "metrics-export-port")


def free_ports(count: int, host: str = "") -> list[int]:
    """Distinct ports free now on host (all held open together while they are picked)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind((host, 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def short_temp_dir() -> str:
    """Ray's Unix sockets live under its temp dir and socket paths are limited to ~107 bytes."""
    return tempfile.mkdtemp(prefix="rm-", dir="/tmp")


class HeadNode:
    """A one-node cluster started with `ray start --head --block`. With `ray_tmpdir`, it runs
    with RAY_TMPDIR set there, so `ray start` records itself in RAY_TMPDIR/ray/ray_current_cluster
    (what raymerge reads to find such a cluster) instead of the machine-wide /tmp/ray."""

    def __init__(self, num_cpus: int = 2, dashboard: bool = False,
                 ray_tmpdir: str | None = None) -> None:
        self.ray_tmpdir = ray_tmpdir
        self.dashboard = dashboard
        self.own_tmpdir = ray_tmpdir is None
        self.tmpdir = ray_tmpdir or short_temp_dir()
        port, self.dashboard_port, *agent_ports = free_ports(7)
        self.address = f"127.0.0.1:{port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
        if ray_tmpdir is not None:
            self.env["RAY_TMPDIR"] = ray_tmpdir
        self.command = [
            RAY_CLI, "start", "--head", "--block", f"--num-cpus={num_cpus}",
            "--disable-usage-stats", f"--port={port}", "--node-ip-address=127.0.0.1",
            f"--include-dashboard={'true' if dashboard else 'false'}",
            f"--dashboard-port={self.dashboard_port}",
            *(f"--{flag}={number}" for flag, number in zip(AGENT_PORT_FLAGS, agent_ports))]
        if ray_tmpdir is None:
            self.command.append(f"--temp-dir={self.tmpdir}")
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> HeadNode:
        self.process = subprocess.Popen(self.command, env=self.env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        from raymerge.distributed.watch import answers

        # `ray start` records the cluster in its temp dir as the last step of starting it; the
        # record holds the address drivers find it by. The dashboard may come up after that.
        temp_dir = Path(self.tmpdir) / "ray" if self.ray_tmpdir else Path(self.tmpdir)
        record = temp_dir / "ray_current_cluster"
        deadline = time.monotonic() + 120
        while not (record.exists() and answers(self.address, 1.0)
                   and (not self.dashboard or _listening(self.dashboard_port))):
            assert self.process.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the head node did not come up in 120 s"
            time.sleep(0.5)
        self.address = record.read_text().strip()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
        if self.own_tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def stop(self) -> None:
        """SIGTERM to `ray start` and every process under it, SIGKILL to what remains."""
        if self.process is None:
            return
        stop_process_tree(self.process.pid)
        self.process.wait(timeout=30)
        self.process = None


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        return True
    except OSError:
        return False


def stop_process_tree(pid: int, grace_s: float = 15.0) -> None:
    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in members:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(members, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
