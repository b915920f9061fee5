"""raymerge against mergekit 0.1.5 itself, method by method, on the same mergekit YAML files.

    python benchmarks/mergekit_equivalence.py [--mergekit-venv /tmp/raymerge-mergekit-venv]
    python benchmarks/mergekit_equivalence.py --examples   # mergekit's own examples/ instead

A synthetic family (a Llama-shaped base, hidden 256, 4 layers, vocab 1024, and 4 fine-tunes with
low-rank-plus-noise deltas) stored in float32, so that magnitude ties at trim thresholds are absent.
For every mergekit method raymerge maps, one YAML file (with a gradient over the layers and a
filter on tensor names wherever the method has a numeric parameter) is merged by `mergekit-yaml`
(in its own virtual environment, created here) and by `raymerge merge` (which maps the same file).

Deterministic methods: the largest relative difference of the merged deltas over all tensors,
‖(W_raymerge − B) − (W_mergekit − B)‖ / ‖W_mergekit − B‖ (target ≤ 1e-5). Random methods (DARE,
DELLA: the two tools draw from different generators, so bytes cannot match): the statistics that
must match instead — the fraction of entries kept, the mean magnitude of the kept entries (the
rescaling) and, for sign-consensus methods, how often the merged sign agrees with the sign of the
sources' sum (the election). Wall time and peak memory (largest process) of each tool.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml
from bench_vs_mergekit import ensure_mergekit
from proctree import run_measured

from raymerge.sources.checkpoint import Checkpoint, read_tensor
from raymerge.synthetic import llama_config, write_base, write_finetune

DIMS = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=1024)
GRADIENT = [0.3, 0.7]
FILTERED = [{"filter": "mlp", "value": 0.4}, {"value": 0.7}]
# merge_method -> (models besides the base, shared parameters, per-model parameters over the
# models (a list per key), whether models carry weights, random)
CASES = {
    "task_arithmetic": (4, {"lambda": 0.8, "normalize": True}, {}, True, False),
    "linear": (4, {}, {}, True, False),
    "ties": (4, {"lambda": 0.9}, {"density": [GRADIENT, 0.5, FILTERED, 0.8]}, True, False),
    "breadcrumbs": (4, {}, {"density": [0.8] * 4, "gamma": [FILTERED, 0.05, 0.1, 0.02]}, True,
                    False),
    "breadcrumbs_ties": (4, {}, {"density": [GRADIENT] * 4, "gamma": [0.02] * 4}, True, False),
    "sce": (4, {"select_topk": GRADIENT}, {}, False, False),
    "slerp": (1, {"t": FILTERED}, {}, False, False),
    "nuslerp": (2, {}, {}, True, False),
    "multislerp": (4, {}, {}, True, False),
    "karcher": (4, {}, {}, False, False),
    "model_stock": (4, {}, {}, False, False),
    "nearswap": (1, {"t": GRADIENT}, {}, False, False),
    "arcee_fusion": (1, {}, {}, False, False),
    "ram": (4, {"epsilon": 0.005}, {}, False, False),
    "ramplus_tl": (4, {"epsilon": 0.005, "r": 0.5}, {}, False, False),
    "dare_linear": (4, {}, {"density": [GRADIENT, 0.5, 0.6, 0.7]}, True, True),
    "dare_ties": (4, {}, {"density": [0.5, FILTERED, 0.6, 0.7]}, True, True),
    "della": (4, {}, {"density": [0.5] * 4, "epsilon": [0.1] * 4}, True, True),
    "della_linear": (4, {}, {"density": [GRADIENT] * 4, "epsilon": [0.2] * 4}, True, True),
}
WEIGHTS = [1.0, 0.5, 0.75, 1.25]


def family(work: Path) -> tuple[Path, list[Path]]:
    base = work / "base"
    if not (base / "config.json").exists():
        write_base(base, llama_config(dtype="float32", **DIMS))
    sources = []
    for index in range(4):
        path = work / f"ft-{index}"
        if not (path / "config.json").exists():
            write_finetune(base, path, seed=index, strength=0.2, noise=0.01)
        sources.append(path)
    return base, sources


def mergekit_yaml(method: str, base: Path, sources: list[Path]) -> dict:
    count, shared, per_model, weighted, _ = CASES[method]
    models = []
    for index, path in enumerate(sources[:count]):
        parameters = {key: values[index] for key, values in per_model.items()}
        if weighted:
            parameters["weight"] = WEIGHTS[index]
        models.append({"model": str(path), "parameters": parameters})
    config = {"merge_method": method, "models": models, "dtype": "float32"}
    if method == "linear":
        config["models"].insert(0, {"model": str(base), "parameters": {"weight": 1.0}})
    else:
        config["base_model"] = str(base)
    if shared:
        config["parameters"] = shared
    return config


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint.open(str(directory), directory)
    return {name: read_tensor(info).double() for name, info in checkpoint.tensors.items()}


def compare(method: str, base: dict, ours: dict, theirs: dict, sources: list[dict]) -> dict:
    if not CASES[method][4]:
        worst, where, worst_in_ulps = 0.0, "", 0.0
        for name, base_tensor in base.items():
            reference = theirs[name] - base_tensor
            scale = max(float(reference.norm()), 1e-30)
            difference = float((ours[name] - base_tensor - reference).norm())
            # what storing W in float32 alone moves M by: one ulp of W, relative to M
            rounding = 2.0**-23 * float(theirs[name].norm())
            worst_in_ulps = max(worst_in_ulps, difference / max(rounding, 1e-30))
            if difference / scale > worst:
                worst, where = difference / scale, name
        return {"max_relative_difference": worst, "tensor": where,
                "max_difference_in_float32_ulps_of_w": worst_in_ulps}
    stats = {}
    for tool, merged in (("raymerge", ours), ("mergekit", theirs)):
        kept = total = magnitude = agree = nonzero = 0.0
        for name, base_tensor in base.items():
            if base_tensor.dim() != 2:
                continue
            delta = merged[name] - base_tensor
            mask = delta != 0
            kept += float(mask.sum())
            total += delta.numel()
            magnitude += float(delta.abs().sum())
            summed = sum(source[name] - base_tensor for source in sources)
            agree += float(((delta.sign() == summed.sign()) & mask).sum())
            nonzero += float(mask.sum())
        stats[tool] = {"kept": kept / total, "mean_abs_kept": magnitude / max(kept, 1),
                       "sign_agrees_with_sum": agree / max(nonzero, 1)}
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/work/mergekit-equivalence")
    parser.add_argument("--mergekit-venv", default="/tmp/raymerge-mergekit-venv")
    parser.add_argument("--methods", nargs="+", default=list(CASES))
    parser.add_argument("--report", default="benchmarks/results/mergekit_equivalence.json")
    parser.add_argument("--compare-only", action="store_true",
                        help="compare the outputs an earlier run left in --work again")
    parser.add_argument("--examples", action="store_true",
                        help="mergekit's examples/ on tiny local models (mergekit_examples.py)")
    parser.add_argument("--examples-dtype", default=None,
                        help="with --examples: replace each example's dtype (e.g. float32)")
    args = parser.parse_args()
    if args.examples:
        run_examples(args)
        return
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base_dir, source_dirs = family(work)
    mergekit = None if args.compare_only else ensure_mergekit(Path(args.mergekit_venv))
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env.pop("RAY_ADDRESS", None)
    base, sources = tensors(base_dir), [tensors(p) for p in source_dirs]
    print(f"command: {' '.join(sys.argv)}", flush=True)
    rows = {}
    for method in args.methods:
        config = work / f"{method}.yaml"
        config.write_text(yaml.safe_dump(mergekit_yaml(method, base_dir, source_dirs)))
        out_mk, out_rm = work / f"out-{method}-mergekit", work / f"out-{method}-raymerge"
        mk, rm = run_both(mergekit, config, out_mk, out_rm, env, args.compare_only)
        count = CASES[method][0]
        result = compare(method, base, tensors(out_rm), tensors(out_mk), sources[:count])
        rows[method] = {**result, "mergekit_seconds": mk["seconds"],
                        "raymerge_seconds": rm["seconds"], "mergekit_peak": mk["peak_rss"],
                        "raymerge_peak": rm["peak_rss"]}
        print(method, json.dumps(rows[method]), flush=True)
    Path(args.report).write_text(json.dumps(rows, indent=2) + "\n")

    print("\n| method | max relative difference of the merged deltas (tensor) | the same "
          "difference in float32 ulps of W | mergekit s | raymerge s | mergekit peak MiB | "
          "raymerge peak MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method, row in rows.items():
        if "max_relative_difference" in row:
            difference = (f"{row['max_relative_difference']:.1e} ({row['tensor']}) | "
                          f"{row['max_difference_in_float32_ulps_of_w']:.2f}")
        else:
            difference = "random: see below | —"
        print(f"| {method} | {difference} | {row['mergekit_seconds']:.1f} | "
              f"{row['raymerge_seconds']:.1f} | {row['mergekit_peak'] / 2**20:.0f} | "
              f"{row['raymerge_peak'] / 2**20:.0f} |")
    print("\n| random method | tool | fraction kept | mean |M| of kept entries | sign agrees "
          "with the sources' sum |")
    print("| --- | --- | --- | --- | --- |")
    for method, row in rows.items():
        for tool in ("raymerge", "mergekit"):
            if tool in row:
                stats = row[tool]
                print(f"| {method} | {tool} | {stats['kept']:.4f} | {stats['mean_abs_kept']:.3e} "
                      f"| {stats['sign_agrees_with_sum']:.4f} |")


def run_both(mergekit: Path | None, config: Path, out_mk: Path, out_rm: Path, env: dict,
             compare_only: bool) -> tuple[dict, dict]:
    """mergekit's and raymerge's runs of one YAML file, each into a fresh output; with
    `compare_only`, neither (the outputs of an earlier run are compared again)."""
    if compare_only:
        nothing = {"seconds": float("nan"), "peak_rss": 0}
        return nothing, nothing
    for out in (out_mk, out_rm):
        shutil.rmtree(out, ignore_errors=True)
    mk = run_measured([str(mergekit), str(config), str(out_mk), "--no-copy-tokenizer", "--quiet",
                       "--no-write-model-card", "--random-seed", "0"], env=env)
    rm = run_measured([sys.executable, "-m", "raymerge.cli", "merge", str(config), "--out",
                       str(out_rm), "--no-progress"], env=env)
    return mk, rm


def run_examples(args) -> None:
    """Every YAML of mergekit's examples/, rewritten onto local models, merged by both tools;
    each output compared whole (names, bytes, relative difference, ulps of the output dtype),
    and config.json's layer count."""
    from mergekit_examples import compare_outputs, example_names, rewritten

    work = Path(args.work).resolve() / "examples"
    work.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.examples_dtype}" if args.examples_dtype else ""
    mergekit = None if args.compare_only else ensure_mergekit(Path(args.mergekit_venv))
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env.pop("RAY_ADDRESS", None)
    print(f"command: {' '.join(sys.argv)}", flush=True)
    rows = {}
    for name in example_names():
        config = work / f"{name}{suffix}.yml"
        config.write_text(yaml.safe_dump(rewritten(name, work, args.examples_dtype),
                                         sort_keys=False))
        out_mk = work / f"out-{name}{suffix}-mergekit"
        out_rm = work / f"out-{name}{suffix}-raymerge"
        try:
            mk, rm = run_both(mergekit, config, out_mk, out_rm, env, args.compare_only)
        except RuntimeError as error:  # refused: the reason is the tool's last line
            rows[name] = {"refused": str(error).strip().splitlines()[-1]}
            print(name, json.dumps(rows[name]), flush=True)
            continue
        layers = [json.loads((out / "config.json").read_text())["num_hidden_layers"]
                  for out in (out_rm, out_mk)]
        rows[name] = {**compare_outputs(tensors_as_stored(out_rm), tensors_as_stored(out_mk)),
                      "layers_raymerge": layers[0], "layers_mergekit": layers[1],
                      "mergekit_seconds": mk["seconds"], "raymerge_seconds": rm["seconds"]}
        print(name, json.dumps(rows[name]), flush=True)
    Path(args.report).with_name(f"mergekit_examples{suffix}.json").write_text(
        json.dumps(rows, indent=2) + "\n")
    print("\n| example | layers (raymerge / mergekit) | tensors identical | max relative "
          "difference (tensor) | max entry difference in ulps of the output dtype at max \\|W\\| "
          "| mergekit s | raymerge s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        if "refused" in row:
            print(f"| {name} | refused: {row['refused']} | | | | | |")
            continue
        where = f" ({row['tensor']})" if row["tensor"] else ""
        print(f"| {name} | {row['layers_raymerge']} / {row['layers_mergekit']} | "
              f"{row['identical_tensors']} of {row['tensors']} | "
              f"{row['max_relative_difference']:.1e}{where} | "
              f"{row['max_difference_in_ulps_of_output_dtype']:.2f} | "
              f"{row['mergekit_seconds']:.1f} | {row['raymerge_seconds']:.1f} |")


def tensors_as_stored(directory: Path) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint.open(str(directory), directory)
    return {name: read_tensor(info) for name, info in checkpoint.tensors.items()}


if __name__ == "__main__":
    main()
