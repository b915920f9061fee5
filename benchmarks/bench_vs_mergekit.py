"""raymerge vs mergekit: wall time and peak memory (largest single process) on the same 8
synthetic fine-tunes of a ~150M-parameter Llama-shaped model (bfloat16), run side by side.

    python benchmarks/bench_vs_mergekit.py --mergekit /path/to/venv/bin/mergekit-yaml

raymerge runs twice per method: "cold", where the command starts (and stops) its own local Ray
cluster and hashes every source for the manifest, and "running cluster", a repeat run against a
cluster started beforehand with `ray start --head` (as under `ray job submit`), which finds the
source hashes remembered. Peak memory counts the Ray worker processes in both.

mergekit is installed in its own virtual environment (it pins its own transformers), e.g.
    python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml
from proctree import run_measured

from raymerge.synthetic import LLAMA_150M, llama_config, write_base, write_finetune

METHODS = {"task_arithmetic": {}, "ties": {"density": 0.5}}


def make_sources(work: Path, count: int) -> tuple[Path, list[Path]]:
    base = work / "base"
    if not (base / "config.json").exists():
        print(f"generating base and {count} fine-tunes in {work} ...", flush=True)
        write_base(base, llama_config(dtype="bfloat16", **LLAMA_150M), max_shard_bytes=2**28)
    sources = []
    for index in range(count):
        path = work / f"ft-{index}"
        if not (path / "config.json").exists():
            write_finetune(base, path, seed=index, max_shard_bytes=2**28)
        sources.append(path)
    return base, sources


def warm_page_cache(paths: list[Path]) -> None:
    """Both tools read from a warm page cache: neither pays the first read from disk."""
    for path in paths:
        for file in sorted(path.glob("*.safetensors")):
            with open(file, "rb") as handle:
                while handle.read(1 << 24):
                    pass


def mergekit_config(base: Path, sources: list[Path], method: str) -> dict:
    parameters = {"weight": 1.0, **METHODS[method]}
    return {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
            "models": [{"model": str(s), "parameters": parameters} for s in sources]}


def raymerge_recipe(base: Path, sources: list[Path], method: str, out: Path) -> dict:
    return {"base": str(base), "sources": [str(s) for s in sources],
            "method": {"name": method, **METHODS[method]},
            "output": {"path": str(out), "dtype": "bfloat16"},
            "runtime": {"num_cpus": 1, "max_in_flight": 4}}


@contextmanager
def running_cluster(env: dict):
    """A local cluster started the way an operator starts one, stopped afterwards."""
    subprocess.run(["ray", "start", "--head", f"--num-cpus={os.cpu_count()}",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True,
                   capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True)


def max_difference(left: Path, right: Path) -> float:
    from raymerge.sources.checkpoint import Checkpoint, read_tensor

    a, b = Checkpoint.open("a", left), Checkpoint.open("b", right)
    return max(float((read_tensor(a.tensors[n]).float() - read_tensor(b.tensors[n]).float())
                     .abs().max()) for n in a.tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", required=True, help="path to mergekit-yaml")
    parser.add_argument("--work", default="benchmarks/work", help="where models are generated")
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()

    work = Path(args.work).resolve()
    base, sources = make_sources(work, args.sources)
    raymerge = shutil.which("raymerge") or sys.exit("raymerge is not on PATH: pip install -e .")
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    print(f"command: {' '.join(sys.argv)}")
    print(f"cpus: {os.cpu_count()}, sources: {len(sources)} x {base.name} "
          f"({sum(f.stat().st_size for f in base.glob('*.safetensors')) / 2**20:.0f} MiB each)")
    rows = []
    for method in args.methods:
        warm_page_cache([base, *sources])
        config = work / f"mergekit-{method}.yaml"
        config.write_text(yaml.safe_dump(mergekit_config(base, sources, method)))
        mk_out = work / f"out-mergekit-{method}"
        shutil.rmtree(mk_out, ignore_errors=True)
        mk = run_measured([args.mergekit, str(config), str(mk_out), "--no-copy-tokenizer",
                           "--quiet", "--no-write-model-card"], env=env)

        warm_page_cache([base, *sources])
        recipe = work / f"raymerge-{method}.yaml"
        rm_out = work / f"out-raymerge-{method}"
        recipe.write_text(yaml.safe_dump(raymerge_recipe(base, sources, method, rm_out)))
        # A first run hashes every source for the manifest; the repeat run on the running cluster
        # finds the hashes remembered, as a scheduled regeneration of unchanged sources does.
        env["RAYMERGE_CACHE"] = tempfile.mkdtemp(prefix="raymerge-bench-cache-")
        cold = run_measured([raymerge, "merge", str(recipe), "--no-progress"], env=env)
        difference = max_difference(rm_out, mk_out)
        rows.append((method, "cold", mk, cold, difference))
        with running_cluster(env):
            warm_page_cache([base, *sources])
            warm = run_measured([raymerge, "merge", str(recipe), "--no-progress", "--address",
                                 "auto"], env=env, also_watch="ray::")
        rows.append((method, "running cluster", mk, warm, difference))

    print()
    print("| method | raymerge Ray | mergekit wall s | raymerge wall s | time ratio "
          "| mergekit peak MiB | raymerge peak MiB (process) | memory ratio | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for method, mode, mk, rm, difference in rows:
        print(f"| {method} | {mode} | {mk['seconds']:.1f} | {rm['seconds']:.1f} | "
              f"{rm['seconds'] / mk['seconds']:.2f} | {mk['peak_rss'] / 2**20:.0f} | "
              f"{rm['peak_rss'] / 2**20:.0f} ({rm['peak_process'].strip()}) | "
              f"{rm['peak_rss'] / mk['peak_rss']:.2f} | {difference:.3g} |")
    for method, mode, _, rm, _ in rows:
        print(f"\nraymerge {method} ({mode}) summary:\n" + "\n".join(
            line for line in rm["output"].splitlines() if line.startswith(("merged", "  "))))


if __name__ == "__main__":
    main()
