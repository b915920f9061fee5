"""raymerge vs mergekit vs a plain one-process loop: wall time, source GB/s and peak memory on the
same 8 synthetic fine-tunes, the tools alternated in one command (2 rounds, medians).

    python benchmarks/bench_vs_mergekit.py --size small      # 8 × ~108 MB (bfloat16)
    python benchmarks/bench_vs_mergekit.py --size 0.67b      # 8 × 1.34 GB: hidden 2048, 12 layers

mergekit 0.1.5 runs from its own virtual environment, created by the script the first time
(`--mergekit-venv`, default /tmp/raymerge-mergekit-venv). raymerge runs as a user runs it:
`raymerge merge` with no cluster running (it starts a private local one), after one untimed
first run that hashes the sources for the manifest (reported apart). The plain loop is the
simplest correct merge: `safe_open` each tensor of each source, `acc += W_i.float() − B`, write
bfloat16 (one process, all tensors of the output in memory until written). Sources are read from a
warm page cache (each run is preceded by a read of every file). Peak memory: the largest resident
set of any single process of the run (raymerge: driver, writer actor and every Ray worker).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml
from proctree import run_measured

from raymerge.synthetic import llama_config, write_family

SIZES = {
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=8, vocab_size=32000),
    "0.67b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
                  num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
}
METHODS = {"task_arithmetic": {}, "ties": {"density": 0.2}}
MERGEKIT = "mergekit==0.1.5"


def make_family(work: Path, size: str, count: int) -> tuple[Path, list[Path]]:
    root = work / f"family-{size}"
    if not (root / "base" / "config.json").exists():
        print(f"generating the {size} base and {count} fine-tunes in {root} ...", flush=True)
    return write_family(root, llama_config(dtype="bfloat16", **SIZES[size]), count)


def ensure_mergekit(venv: Path) -> Path:
    """mergekit-yaml from its own venv (mergekit pins its own transformers)."""
    executable = venv / "bin" / "mergekit-yaml"
    if not executable.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU build where it is local
        subprocess.run([*pip, MERGEKIT], check=True)
    return executable


def warm_page_cache(paths: list[Path]) -> None:
    for path in paths:
        for file in sorted(path.glob("*.safetensors")):
            with open(file, "rb") as handle:
                while handle.read(1 << 24):
                    pass


def source_bytes(sources: list[Path]) -> int:
    return sum(f.stat().st_size for s in sources for f in s.glob("*.safetensors"))


PLAIN_LOOP = r"""
import sys, torch
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
base, out, *sources = map(Path, sys.argv[1:])
def files(directory):
    return sorted(directory.glob("*.safetensors"))
where = {}
for path in [base, *sources]:
    for file in files(path):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                where[(path, name)] = file
merged = {}
for (path, name), file in where.items():
    if path != base:
        continue
    with safe_open(file, "pt") as handle:
        b = handle.get_tensor(name).float()
    acc = torch.zeros_like(b)
    for source in sources:
        with safe_open(where[(source, name)], "pt") as handle:
            acc += handle.get_tensor(name).float() - b
    merged[name] = (b + acc).to(torch.bfloat16)
out.mkdir(parents=True, exist_ok=True)
save_file(merged, out / "model.safetensors")
"""


def run_raymerge(work: Path, base: Path, sources: list[Path], method: str, env: dict) -> dict:
    out = work / f"out-raymerge-{method}"
    recipe = work / f"raymerge-{method}.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(base), "sources": [str(s) for s in sources],
        "method": {"name": method, **METHODS[method]},
        "output": {"path": str(out), "dtype": "bfloat16"}}))
    run = run_measured([sys.executable, "-m", "raymerge.cli", "merge", str(recipe),
                        "--no-progress", "--json"], env=env)
    record = json.loads(run["output"].strip().splitlines()[-1])
    return {**run, "merge_seconds": record["seconds"], "output_path": out}


def run_mergekit(work: Path, base: Path, sources: list[Path], method: str, mergekit: Path,
                 env: dict) -> dict:
    config = work / f"mergekit-{method}.yaml"
    parameters = {"weight": 1.0, **METHODS[method]}
    config.write_text(yaml.safe_dump({
        "merge_method": method, "base_model": str(base), "dtype": "bfloat16",
        "models": [{"model": str(s), "parameters": parameters} for s in sources]}))
    out = work / f"out-mergekit-{method}"
    return {**run_measured([str(mergekit), str(config), str(out), "--no-copy-tokenizer",
                            "--quiet", "--no-write-model-card"], env=env), "output_path": out}


def run_plain(work: Path, base: Path, sources: list[Path], env: dict) -> dict:
    out = work / "out-plain"
    return {**run_measured([sys.executable, "-c", PLAIN_LOOP, str(base), str(out),
                            *map(str, sources)], env=env), "output_path": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--work", default="benchmarks/work")
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--mergekit-venv", default="/tmp/raymerge-mergekit-venv")
    parser.add_argument("--no-mergekit", action="store_true", help="raymerge and the loop only")
    args = parser.parse_args()

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base, sources = make_family(work, args.size, args.sources)
    mergekit = None if args.no_mergekit else ensure_mergekit(Path(args.mergekit_venv))
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env.pop("RAY_ADDRESS", None)
    read = source_bytes(sources)
    print(f"command: {' '.join(sys.argv)}")
    print(f"cpus: {os.cpu_count()}; {len(sources)} sources of {args.size}, "
          f"{read / len(sources) / 1e9:.3f} GB each, {read / 1e9:.2f} GB read in all")
    # A first merge hashes every source file for the manifest (sha256, remembered by path, size
    # and mtime under RAYMERGE_CACHE): timed apart, so the rounds compare the merges themselves.
    env["RAYMERGE_CACHE"] = str(work / "raymerge-cache")
    shutil.rmtree(env["RAYMERGE_CACHE"], ignore_errors=True)
    warm_page_cache([base, *sources])
    first = run_raymerge(work, base, sources, args.methods[0], env)
    print(f"first raymerge run ({args.methods[0]}, hashing the sources): "
          f"{first['seconds']:.1f} s wall", flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    for round_index in range(args.rounds):
        for method in args.methods:
            tools = [("raymerge", lambda m=method: run_raymerge(work, base, sources, m, env))]
            if mergekit is not None:
                tools.append(("mergekit", lambda m=method: run_mergekit(work, base, sources, m,
                                                                        mergekit, env)))
            if method == "task_arithmetic":
                tools.append(("plain loop", lambda: run_plain(work, base, sources, env)))
            for tool, run in tools:
                warm_page_cache([base, *sources])
                result = run()
                results.setdefault((method, tool), []).append(result)
                print(f"round {round_index + 1} {method} {tool}: {result['seconds']:.1f} s, "
                      f"peak {result['peak_rss'] / 2**30:.2f} GiB", flush=True)

    print()
    print("| method | tool | wall s (median) | GB/s of sources | peak memory GiB (process) | "
          "time ÷ mergekit | memory ÷ mergekit |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method in args.methods:
        reference = results.get((method, "mergekit"))
        for (row_method, tool), runs in results.items():
            if row_method != method:
                continue
            wall = statistics.median(r["seconds"] for r in runs)
            peak = max(r["peak_rss"] for r in runs)
            ratio = memory = "—"
            if reference:
                ratio = f"{wall / statistics.median(r['seconds'] for r in reference):.2f}"
                memory = f"{peak / max(r['peak_rss'] for r in reference):.2f}"
            process = " ".join(runs[0]["peak_process"].split())[:48]  # one table cell
            print(f"| {method} | {tool} | {wall:.1f} | {read / wall / 1e9:.2f} | "
                  f"{peak / 2**30:.2f} ({process}) | {ratio} | {memory} |")
        merges = [r["merge_seconds"] for r in results[(method, "raymerge")]]
        print(f"\nraymerge {method}: merge time (the summary's, from the cluster's connection "
              f"to the finished output) median {statistics.median(merges):.1f} s, "
              f"{read / statistics.median(merges) / 1e9:.2f} GB/s of sources\n")


if __name__ == "__main__":
    main()
