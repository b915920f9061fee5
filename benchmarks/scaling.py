"""Scaling in the number of sources: N = 4, 8, 16, 32 synthetic fine-tunes of a Llama-shaped
model (~34M parameters, bfloat16, 8 blocks); merge time and peak memory per task for task
arithmetic, TIES and AXIS+SVC.

    python benchmarks/scaling.py [--sizes 4 8 16 32]

Each merge runs as `raymerge merge` on a cluster started beforehand (`ray start --head`), sources
in the page cache and their hashes remembered. Per-task peak memory is each task's own measured
peak RSS increase (raymerge_manifest.json summary.peak_task_bytes_measured, the largest over the
tasks). Prints a table and writes benchmarks/work/scaling/scaling.json and scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml
from bench_vs_mergekit import running_cluster, warm_page_cache
from proctree import run_measured

from raymerge.synthetic import llama_config, write_base, write_finetune

SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=8, vocab_size=8000)
METHODS = {
    "task_arithmetic": {"method": {"name": "task_arithmetic", "scale": 0.3}},
    "ties": {"method": {"name": "ties", "density": 0.2}},
    "axis+svc": {"method": {"name": "axis", "k": 0.1}, "calibrate": {"svc": {"alpha": "auto"}}},
}


def family(work: Path, count: int) -> tuple[Path, list[Path]]:
    base = work / "base"
    if not (base / "config.json").exists():
        write_base(base, llama_config(dtype="bfloat16", **SHAPE))
    sources = []
    for index in range(count):
        path = work / f"ft-{index}"
        if not (path / "config.json").exists():
            write_finetune(base, path, seed=index)
        sources.append(path)
    return base, sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--work", default="benchmarks/work/scaling")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    base, sources = family(work, max(args.sizes))
    warm_page_cache([base, *sources])
    raymerge = shutil.which("raymerge") or sys.exit("raymerge is not on PATH: pip install -e .")
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    print(f"command: {' '.join(sys.argv)}", flush=True)
    rows = []
    with running_cluster(env):
        for label, settings in METHODS.items():
            for count in args.sizes:
                out = work / f"out-{label}-{count}"
                recipe = work / f"{label}-{count}.yaml"
                recipe.write_text(yaml.safe_dump({
                    "base": str(base), "sources": [str(p) for p in sources[:count]], **settings,
                    "output": {"path": str(out)}, "runtime": {"max_in_flight": 2}}))
                for _ in range(2):  # the first run hashes new sources; the second is measured
                    measured = run_measured([raymerge, "merge", str(recipe), "--no-progress"],
                                            env=env)
                summary = json.loads((out / "raymerge_manifest.json").read_text())["summary"]
                rows.append({"method": label, "sources": count,
                             "wall_s": round(measured["seconds"], 2),
                             "merge_s": round(summary["seconds"], 2),
                             "task_s": round(summary["task_seconds_total"], 2),
                             "read_gib": round(summary["read_bytes"] / 2**30, 2),
                             "peak_task_mib": round(summary["peak_task_bytes_measured"] / 2**20),
                             "estimate_mib": round(summary["peak_task_bytes_estimated"] / 2**20)})
                print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(out)
    (work / "scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| method | N | wall s | merge s | task-seconds | read GiB | merge s per source | "
          "peak memory per task MiB | estimate MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['method']} | {row['sources']} | {row['wall_s']} | {row['merge_s']} | "
              f"{row['task_s']} | {row['read_gib']} | {row['merge_s'] / row['sources']:.2f} | "
              f"{row['peak_task_mib']} | {row['estimate_mib']} |")
    plot(rows, work / "scaling.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        sizes = [r["sources"] for r in mine]
        time_axes.plot(sizes, [r["merge_s"] for r in mine], marker="o", label=method)
        memory_axes.plot(sizes, [r["peak_task_mib"] for r in mine], marker="o", label=method)
    time_axes.set(xlabel="sources N", ylabel="merge time (s)",
                  title="merge time (fixed start-up + per source)")
    memory_axes.set(xlabel="sources N", ylabel="peak memory per task (MiB)",
                    title="peak memory per task")
    for axes in (time_axes, memory_axes):
        axes.set_xticks(sorted({r["sources"] for r in rows}))
        axes.set_ylim(bottom=0)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
