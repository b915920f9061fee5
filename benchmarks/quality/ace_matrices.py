"""ACE-Merging per matrix on a suite's fine-tunes: the trace statistic γ and the branch it picks,
how much of each task matrix its row-centring removes (the mean row's share of ‖Δ_i‖²), the
merge's size against the mean and the sum of the task matrices, and how much of each task the
merge keeps (⟨M, Δ_i⟩ / ‖Δ_i‖², 1/N for the mean, 1 for the sum of orthogonal tasks). The merge is
raymerge's `ace` method itself, fed one source at a time as the engine feeds it (no Ray).

    python benchmarks/quality/ace_matrices.py [--work benchmarks/work/quality]

Needs the encoder suite's base and fine-tunes under --work (run encoder_suite.py first).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from selection import open_work, read_tensors
from tasks import SOURCES

from raymerge.methods import MergeOptions, build_method
from raymerge.recipe import method_settings


def ace_merge(name: str, deltas: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    method = build_method(method_settings({"name": "ace"}), [1.0] * len(deltas), MergeOptions())
    method.begin(name, torch.zeros_like(deltas[0]))
    for pass_index in range(method.passes):
        for index, delta in enumerate(deltas):
            method.update(pass_index, index, delta.clone())
    return method.finish(), method.report.stats


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/work/quality")
    parser.add_argument("--results", default="ace_matrices.json", help="file name under --work")
    args = parser.parse_args(argv)
    work = open_work(args.work)
    tasks = list(SOURCES)
    base = read_tensors(work / "base")
    sources = [read_tensors(work / "finetunes" / task / "encoder") for task in tasks]
    options = MergeOptions()
    rows = []
    for name, base_tensor in base.items():
        if not options.is_spectral_matrix(name, base_tensor.shape):
            continue
        deltas = [source[name] - base_tensor for source in sources]
        merged, stats = ace_merge(name, deltas)
        total, mean = sum(deltas), sum(deltas) / len(deltas)
        rows.append({
            "matrix": name, "shape": list(base_tensor.shape), "gamma": stats["ace_gamma"],
            "heterogeneous": stats["ace_heterogeneous"],
            "traces": [float(d.square().sum()) for d in deltas],
            "mean_row_share": [float(d.mean(0).square().sum() * d.shape[0] / d.square().sum())
                               for d in deltas],
            "norm_over_mean": float(merged.norm() / mean.norm()),
            "norm_over_sum": float(merged.norm() / total.norm()),
            "kept_per_task": [float((merged * d).sum() / d.square().sum()) for d in deltas],
        })
    heterogeneous = sum(row["heterogeneous"] for row in rows)
    summary = {
        "matrices": len(rows), "heterogeneous": heterogeneous,
        "gamma_median": statistics.median(row["gamma"] for row in rows),
        "norm_over_mean_median": statistics.median(row["norm_over_mean"] for row in rows),
        "norm_over_sum_median": statistics.median(row["norm_over_sum"] for row in rows),
        "mean_row_share_median_per_task": {
            task: statistics.median(row["mean_row_share"][i] for row in rows)
            for i, task in enumerate(tasks)},
        "kept_per_task_median": {
            task: statistics.median(row["kept_per_task"][i] for row in rows)
            for i, task in enumerate(tasks)},
    }
    result = {"tasks": tasks, "summary": summary, "rows": rows}
    (work / args.results).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()
