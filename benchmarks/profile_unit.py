"""Where one work unit's time goes: `merge_unit` (what a Ray task runs) on one transformer block
of the 0.67B family, one thread, under cProfile, grouped into reading, the method's arithmetic,
statistics and output conversion.

    python benchmarks/profile_unit.py --method task_arithmetic \
        [--family benchmarks/work/family-0.67b] [--rounds 3]

The family is the one `bench_vs_mergekit.py --size 0.67b` generates. The figure per thread is the
unit's source bytes over its wall time; a Ray task has one thread (num_cpus: 1).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import re
import time
from pathlib import Path

from raymerge.execute import MergeJob, merge_unit
from raymerge.plan import make_plan
from raymerge.recipe import method_settings
from raymerge.sources import Checkpoint

SETTINGS = {"task_arithmetic": {}, "ties": {"density": 0.2}, "axis": {"k": 0.1},
            "tsv": {}, "iso_cts": {}}
# function name -> phase (cProfile's own time, by the innermost call)
PHASES = {
    "preadv": "read: pread of the file's bytes", "copy_": "read: convert to float32",
    "sub": "read: convert and subtract the base", "sub_": "read: subtract the base",
    "sum": "read: finite check",
    "partition": "method: TIES threshold (selection)", "where": "method: sign election",
    "add_": "method: running sums", "clamp": "method: running sums", "mul_": "method: trim, scale",
    "abs": "method: magnitudes", "linalg_svd": "method: SVD", "linalg_qr": "method: QR",
    "matmul": "method: matrix products", "__matmul__": "method: matrix products",
    "zeros_like": "allocation of state", "empty_like": "allocation of state",
    "linalg_vector_norm": "statistics", "aminmax": "statistics", "quantile": "statistics",
    "to": "output: cast to the output dtype",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="benchmarks/work/family-0.67b")
    parser.add_argument("--method", default="task_arithmetic", choices=sorted(SETTINGS))
    parser.add_argument("--svc", action="store_true")
    parser.add_argument("--unit", default="model.layers.3")
    parser.add_argument("--top", type=int, default=0, help="also print cProfile's top N")
    parser.add_argument("--rounds", type=int, default=0,
                        help="first time this many runs without the profiler, print the best")
    args = parser.parse_args()
    root = Path(args.family)
    base = Checkpoint.open("base", root / "base")
    sources = [Checkpoint.open(str(p), p) for p in sorted(root.glob("ft-*"))]
    plan = make_plan(base, sources, output_dtype="BF16")
    unit = next(u for u in plan.units if u.name == args.unit)
    job = MergeJob(base=base, sources=sources, weights=[1.0] * len(sources),
                   method=method_settings({"name": args.method, **SETTINGS[args.method]}),
                   svc_alpha=1 / len(sources) if args.svc else None, num_threads=1)
    merge_unit(job, unit)  # warm: page cache, allocator, torch's kernels
    source_bytes = sum(s.nbytes_of(t.name) for s in sources for t in unit.tensors)
    if args.rounds:
        times = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            merge_unit(job, unit)
            times.append(time.perf_counter() - started)
        print(f"{args.method}: unit {unit.name}, best of {args.rounds} without the profiler "
              f"{min(times):.2f} s = {source_bytes / min(times) / 1e9:.2f} GB/s per thread "
              f"(all: {', '.join(f'{t:.2f}' for t in times)} s)")
    profile = cProfile.Profile()
    started, cpu = time.perf_counter(), time.process_time()
    profile.enable()
    merge_unit(job, unit)
    profile.disable()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(f"{args.method}{'+svc' if args.svc else ''}: unit {unit.name}, {len(sources)} sources, "
          f"{source_bytes / 1e9:.2f} GB of sources: {wall:.2f} s wall, {cpu:.2f} s CPU, "
          f"{source_bytes / wall / 1e9:.2f} GB/s per thread")
    stats = pstats.Stats(profile)
    phases: dict[str, float] = {}
    for (_, _, function), (_, _, own, _, _) in stats.stats.items():
        found = re.search(r"method '(\w+)'|built-in method ([\w.]+)", function)
        name = (found.group(1) or found.group(2)).rsplit(".", 1)[-1] if found else function
        phase = PHASES.get(name, "other")
        phases[phase] = phases.get(phase, 0.0) + own
    total = sum(phases.values())
    for phase, seconds in sorted(phases.items(), key=lambda item: -item[1]):
        print(f"  {phase:<40} {seconds:6.2f} s  {100 * seconds / total:5.1f} %")
    if args.top:
        stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
