"""The spectral methods against task arithmetic on the same 8 synthetic fine-tunes (the family
`bench_vs_mergekit.py --size` builds; bfloat16), on the CPU: wall time, merge time, task-seconds
and peak memory per task.

    python benchmarks/bench_spectral_cpu.py [--size small]

Each recipe runs twice as a user runs it (`raymerge merge`, a private local cluster per command),
the sources in the page cache; the first run fills the source-hash cache, the second is reported,
so the figures compare the merge work. AXIS `k: 0.1`, SVC `alpha: auto`, everything else the
methods' defaults; `runtime.num_cpus: 1`, so both cores run a unit each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml
from bench_vs_mergekit import SIZES, make_family, source_bytes, warm_page_cache
from proctree import run_measured

RECIPES = {
    "task_arithmetic": {"method": {"name": "task_arithmetic"}},
    "axis+svc": {"method": {"name": "axis", "k": 0.1}, "calibrate": {"svc": {"alpha": "auto"}}},
    "axis": {"method": {"name": "axis", "k": 0.1}},
    "tsv": {"method": {"name": "tsv"}},
    "iso_cts": {"method": {"name": "iso_cts"}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--work", default="benchmarks/work")
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    work = Path(args.work).resolve()
    base, sources = make_family(work, args.size, 8)
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "RAYMERGE_CACHE": str(work / "raymerge-cache")}
    print(f"command: {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}")
    print(f"cpus: {os.cpu_count()}; 8 sources of {args.size}", flush=True)
    rows = []
    for label in args.methods:
        out = work / f"out-spectral-{label}"
        recipe = work / f"spectral-{label}.yaml"
        recipe.write_text(yaml.safe_dump({
            "base": str(base), "sources": [str(s) for s in sources], **RECIPES[label],
            "output": {"path": str(out), "dtype": "bfloat16"},
            "runtime": {"num_cpus": 1}}))
        for _ in range(2):  # the first run fills the hash cache; report the second
            warm_page_cache([base, *sources])
            measured = run_measured([sys.executable, "-m", "raymerge.cli", "merge", str(recipe),
                                     "--no-progress", "--json"], env=env)
        summary = json.loads((out / "raymerge_manifest.json").read_text())["summary"]
        rows.append((label, measured, summary))
        print(f"{label}: {measured['seconds']:.1f} s wall, merge {summary['seconds']:.1f} s",
              flush=True)
    reference = rows[0][2]["seconds"]
    inputs = source_bytes(sources)  # as bench_vs_mergekit: the fine-tunes, each once
    print("\n| method | wall s | merge s | × task arithmetic (merge) | task-seconds "
          "| GB/s of sources (merge) | peak memory per task MiB | largest process MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, measured, summary in rows:
        read = inputs / summary["seconds"] / 1e9
        print(f"| {label} | {measured['seconds']:.1f} | {summary['seconds']:.1f} | "
              f"{summary['seconds'] / reference:.2f} | {summary['task_seconds_total']:.1f} | "
              f"{read:.2f} | {summary['peak_task_bytes_measured'] / 2**20:.0f} | "
              f"{measured['peak_rss'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
