"""How far WUDI's Adam gets on the encoder suite's fine-tunes: per weight matrix, WUDI's objective
L(M) = Σ_i ‖(M − Δ_i)·Δ_iᵀ‖²_F / ‖Δ_i‖²_F at its starting point (the sum of the task vectors),
after `raymerge merge` with `wudi` at each learning rate given (300 steps unless --iter-num), and
at the exact minimiser (M·G = B solved by least squares, float64), with ‖M‖ / ‖Σ Δ_i‖.

    python benchmarks/quality/wudi_convergence.py [--work benchmarks/work/quality] \
        [--lr 1e-5 1e-4 1e-3]

Needs the encoder suite's base and fine-tunes under --work (run encoder_suite.py first).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from selection import merge, open_work, read_tensors
from tasks import SOURCES


def objective_terms(deltas: list[torch.Tensor]):
    """G = Σ ΔᵢᵀΔᵢ/‖Δᵢ‖², B = Σ Δᵢ·ΔᵢᵀΔᵢ/‖Δᵢ‖², c = Σ ‖ΔᵢᵀΔᵢ‖²/‖Δᵢ‖²: L(M) = ⟨M, M·G − 2B⟩ + c."""
    grams = [(d, d.T @ d, (d * d).sum()) for d in deltas]
    gram = sum(g / n for _, g, n in grams)
    target = sum(d @ g / n for d, g, n in grams)
    constant = sum((g * g).sum() / n for _, g, n in grams)
    return gram, target, constant


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/work/quality")
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3])
    parser.add_argument("--iter-num", type=int, default=300)
    args = parser.parse_args(argv)
    work = open_work(args.work)
    base = work / "base"
    sources = [work / "finetunes" / name / "encoder" for name in SOURCES]
    missing = [str(s) for s in [base, *sources] if not s.exists()]
    if missing:
        raise SystemExit(f"{missing[0]} not found: run encoder_suite.py --work {args.work} first")

    from raymerge.distributed.cluster import ray_session

    merged, seconds = {}, {}
    with ray_session():
        for lr in args.lr:
            started = time.perf_counter()
            out = merge(base, sources, {"name": "wudi", "iter_num": args.iter_num, "lr": lr},
                        1.0, False, work / "wudi-convergence" / f"lr{lr:g}")
            merged[lr], seconds[lr] = read_tensors(out), round(time.perf_counter() - started, 1)
    base_tensors = read_tensors(base)
    source_tensors = [read_tensors(s) for s in sources]
    matrices = [name for name, t in base_tensors.items()
                if t.ndim == 2 and "embeddings" not in name]  # the ones WUDI optimises here
    columns = ["sum", *(f"lr {lr:g}" for lr in args.lr), "optimum"]
    losses = {c: [] for c in columns}
    norms = {c: [] for c in columns}
    for name in matrices:
        b = base_tensors[name].double()
        deltas = [s[name].double() - b for s in source_tensors]
        gram, target, constant = objective_terms(deltas)
        total = sum(deltas)
        candidates = {"sum": total,
                      **{f"lr {lr:g}": merged[lr][name].double() - b for lr in args.lr},
                      "optimum": torch.linalg.lstsq(gram.T, target.T).solution.T}
        for column, m in candidates.items():
            losses[column].append(float((m * (m @ gram - 2 * target)).sum() + constant))
            norms[column].append(float(m.norm() / total.norm()))

    def ratios(column):  # per matrix, this M's loss over the optimum's
        return sorted(x / o for x, o in zip(losses[column], losses["optimum"]))

    summary = {c: {"total_loss": sum(losses[c]),
                   "total_over_optimum": sum(losses[c]) / sum(losses["optimum"]),
                   "median_over_optimum": ratios(c)[len(matrices) // 2],
                   "norm_over_sum": sum(norms[c]) / len(matrices)} for c in columns}
    print(f"\n{len(matrices)} matrices, {len(sources)} sources, {args.iter_num} Adam steps\n")
    print("| M | loss, summed over matrices | ÷ optimum's | median over matrices of ÷ optimum's "
          "| mean ‖M‖ ÷ ‖Σ Δᵢ‖ | merge |")
    print("| --- | --- | --- | --- | --- | --- |")
    merge_time = {f"lr {lr:g}": f"{seconds[lr]} s" for lr in args.lr}
    for c in columns:
        print(f"| {c} | {summary[c]['total_loss']:.4g} | {summary[c]['total_over_optimum']:.2f} | "
              f"{summary[c]['median_over_optimum']:.2f} | {summary[c]['norm_over_sum']:.2f} | "
              f"{merge_time.get(c, '—')} |")
    results = {"matrices": len(matrices), "iter_num": args.iter_num, "summary": summary,
               "merge_seconds": {str(k): v for k, v in seconds.items()}}
    (work / "wudi-convergence.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
