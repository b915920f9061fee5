"""Run a command and measure its wall time and the peak RSS of each process in its tree."""

from __future__ import annotations

import subprocess
import time

import psutil


def run_measured(command: list[str], env: dict | None = None, interval: float = 0.02,
                 also_watch: str | None = None) -> dict:
    """Wall seconds, and the largest peak RSS of any single process of the command's tree
    (sampled every `interval` s), with that process's name. `also_watch`: a command-line prefix
    of other processes to include (Ray workers of an already running cluster: 'ray::')."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    root = psutil.Process(process.pid)
    peaks: dict[int, tuple[int, str]] = {}
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        if also_watch:
            tree += [p for p in psutil.process_iter(["cmdline"])
                     if " ".join(p.info["cmdline"] or []).startswith(also_watch)]
        for member in tree:
            try:
                rss = member.memory_info().rss
                name = " ".join(member.cmdline()[:3])[:60]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if rss > peaks.get(member.pid, (0, ""))[0]:
                peaks[member.pid] = (rss, name)
        time.sleep(interval)
    output = process.stdout.read()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    biggest_rss, biggest_name = max(peaks.values(), default=(0, ""))
    return {"seconds": seconds, "peak_rss": biggest_rss, "peak_process": biggest_name,
            "processes": len(peaks), "output": output}
