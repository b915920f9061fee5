"""AXIS+SVC against task arithmetic on the same 8 synthetic fine-tunes of the ~150M Llama
(bfloat16), on the CPU: wall time, merge time and peak memory per task.

    python benchmarks/bench_spectral_cpu.py

Both run as repeat runs on a Ray cluster started beforehand (`ray start --head`), the sources in
the page cache and their hashes remembered, so the figures compare the merge work itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import yaml
from bench_vs_mergekit import make_sources, running_cluster, warm_page_cache
from proctree import run_measured

RECIPES = {
    "task_arithmetic": {"method": {"name": "task_arithmetic"}},
    "axis+svc": {"method": {"name": "axis", "k": 0.1}, "calibrate": {"svc": {"alpha": "auto"}}},
    "axis": {"method": {"name": "axis", "k": 0.1}},
}


def main() -> None:
    work = Path("benchmarks/work").resolve()
    base, sources = make_sources(work, 8)
    raymerge = shutil.which("raymerge") or sys.exit("raymerge is not on PATH: pip install -e .")
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    print(f"command: {' '.join(sys.argv)}")
    rows = []
    with running_cluster(env):
        for label, settings in RECIPES.items():
            out = work / f"out-spectral-{label}"
            recipe = work / f"spectral-{label}.yaml"
            recipe.write_text(yaml.safe_dump({
                "base": str(base), "sources": [str(s) for s in sources], **settings,
                "output": {"path": str(out), "dtype": "bfloat16"},
                "runtime": {"num_cpus": 1, "max_in_flight": 4}}))
            for _ in range(2):  # the first run fills the hash cache; report the second
                warm_page_cache([base, *sources])
                measured = run_measured([raymerge, "merge", str(recipe), "--no-progress",
                                         "--address", "auto"], env=env, also_watch="ray::")
            summary = json.loads((out / "raymerge_manifest.json").read_text())["summary"]
            rows.append((label, measured, summary))
    reference = rows[0][2]["seconds"]
    print("\n| method | wall s | merge s | × task arithmetic (merge) | task-seconds "
          "| peak memory per task MiB | largest process MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, measured, summary in rows:
        print(f"| {label} | {measured['seconds']:.1f} | {summary['seconds']:.1f} | "
              f"{summary['seconds'] / reference:.2f} | {summary['task_seconds_total']:.1f} | "
              f"{summary['peak_task_bytes_measured'] / 2**20:.0f} | "
              f"{measured['peak_rss'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
