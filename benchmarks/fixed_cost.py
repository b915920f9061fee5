"""What a small merge pays before and after its work: interpreter start, imports, Ray start, the
first worker, shutdown, measured one by one (medians of --rounds runs), then the demo whole.

    python benchmarks/fixed_cost.py [--rounds 3]

Each part runs in a fresh interpreter, as a `raymerge merge` command would pay it. The demo's
figure is `raymerge demo` (tiny Llama, 3 fine-tunes, TIES) measured end to end, with the merge
time it reports (from the Ray connection to the finished output) beside it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Ray's own start and stop, and a first task in a new worker importing the engine
_RAY = r"""
import time
started = time.perf_counter()
import ray
imported = time.perf_counter()
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
up = time.perf_counter()
def first():
    import raymerge.execute  # noqa: F401  (what a merge task imports before its first unit)
    return 0
ray.get(ray.remote(first).options(num_cpus=1).remote())
worked = time.perf_counter()
ray.get(ray.remote(first).options(num_cpus=1).remote())
again = time.perf_counter()
ray.shutdown()
down = time.perf_counter()
print(imported - started, up - imported, worked - up, again - worked, down - again)
"""


def wall(command: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - started, run.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    python = sys.executable
    raymerge = str(Path(python).with_name("raymerge"))
    parts: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        parts.setdefault(name, []).append(seconds)

    for _ in range(args.rounds):
        add("interpreter start (python -c pass)", wall([python, "-c", "pass"], env)[0])
        add("import torch", wall([python, "-c", "import torch"], env)[0])
        add("import the driver (raymerge.merge, raymerge.cli)",
            wall([python, "-c", "import raymerge.merge, raymerge.cli"], env)[0])
        _, out = wall([python, "-c", _RAY], env)
        imported, up, first, second, down = map(float, out.split())
        add("import ray", imported)
        add("ray.init (a private local cluster)", up)
        add("first task in a new worker (imports torch and the engine)", first)
        add("a task in a warm worker", second)
        add("ray.shutdown", down)
        work = Path(tempfile.mkdtemp(prefix="raymerge-fixed-"))
        try:
            seconds, out = wall([raymerge, "demo", str(work / "demo")], env)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        add("raymerge demo, whole command", seconds)
        merge = re.search(r"time\s+([0-9.]+) s", out)
        if merge:
            add("raymerge demo, its merge time (reported)", float(merge.group(1)))

    print(f"command: {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}")
    print(f"cpus: {os.cpu_count()}; medians of {args.rounds} rounds")
    print()
    print("| part | seconds (median) | min | max |")
    print("| --- | --- | --- | --- |")
    for name, values in parts.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | "
              f"{max(values):.2f} |")


if __name__ == "__main__":
    main()
