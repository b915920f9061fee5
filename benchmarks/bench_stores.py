"""Sources in object storage against local disk, on a local SeaweedFS S3 server (the one the tests
use): fetch throughput of one task's reader with 1 and with k range requests in flight, the small
family's merge from S3 against from local directories, and the driver's time before the first
task (resolve, validate, plan) for both.

    python benchmarks/bench_stores.py [--size small] [--sources 8] [--in-flight 1 4 8]

The family is bench_vs_mergekit.py's (generated under benchmarks/work the first time). The S3
server runs on loopback: its figures are this machine's CPU and memory bandwidth shared with the
reader, not a network's; they show what parallel ranges and the pipeline cost or gain, not S3's
speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_vs_mergekit import make_family  # noqa: E402
from servers.seaweed import SeaweedS3  # noqa: E402


def fetch_throughput(uri: str, size: int, endpoint: str, in_flight: int) -> float:
    """GB/s of one reader fetching `size` bytes of one object in 32 MiB reads."""
    from raymerge.store import StorageSettings, open_bytes

    source = open_bytes(uri, StorageSettings(endpoint=endpoint, ranges_in_flight=in_flight))
    buffer = bytearray(32 << 20)
    started = time.perf_counter()
    for offset in range(0, size - len(buffer) + 1, len(buffer)):
        source.read_into(memoryview(buffer), offset)
    return (size // len(buffer) * len(buffer)) / (time.perf_counter() - started) / 1e9


def merge(recipe: dict, work: Path, name: str, env: dict) -> dict:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "raymerge.cli", "merge", str(path),
                          "--no-progress", "--json"], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(run.stderr[-2000:])
    record = json.loads(run.stdout.strip().splitlines()[-1])
    return {"wall": time.perf_counter() - started, "merge": record["seconds"]}


def driver_time(recipe: dict) -> float:
    """Seconds from the recipe to the plan: what the driver does before the first task."""
    from raymerge.merge import prepare
    from raymerge.recipe import recipe_from_dict

    started = time.perf_counter()
    prepare(recipe_from_dict(recipe))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "work"))
    args = parser.parse_args()
    work = Path(args.work).resolve()
    base, sources = make_family(work, args.size, args.sources)
    print(f"command: {' '.join(sys.argv)}")
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "RAYMERGE_CACHE": tempfile.mkdtemp(prefix="rm-bench-cache-")}
    server = SeaweedS3(Path(tempfile.mkdtemp(prefix="rm-bench-s3-")))
    server.start()
    try:
        os.environ.update(server.env())
        env.update(server.env())
        names = {"base": base, **{f"ft-{i}": s for i, s in enumerate(sources)}}
        started = time.perf_counter()
        for name, directory in names.items():
            server.upload_directory(directory, f"bench/{args.size}/{name}")
        total = sum(f.stat().st_size for d in names.values() for f in d.iterdir())
        print(f"uploaded {total / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s")
        shard = max(Path(base).glob("*.safetensors"), key=lambda f: f.stat().st_size)
        uri = f"s3://bench/{args.size}/base/{shard.name}"
        for in_flight in args.in_flight:
            rates = [fetch_throughput(uri, shard.stat().st_size, server.endpoint_url, in_flight)
                     for _ in range(2)]
            print(f"fetch, {in_flight} range(s) in flight: {max(rates):.2f} GB/s "
                  f"(best of 2, {shard.stat().st_size / 1e6:.0f} MB object)")
        storage = {"endpoint": server.endpoint_url}
        local = {"base": str(base), "sources": [str(s) for s in sources],
                 "method": {"name": "task_arithmetic"}}
        remote = {"base": f"s3://bench/{args.size}/base", "storage": storage,
                  "sources": [f"s3://bench/{args.size}/ft-{i}" for i in range(len(sources))],
                  "method": {"name": "task_arithmetic"}}
        print(f"driver before the first task, local: {driver_time(local):.2f} s; "
              f"S3: {driver_time(remote):.2f} s (metadata fetched once, then cached)")
        for name, recipe in (("local", local), ("s3", remote)):
            out = work / f"out-stores-{name}"
            result = merge({**recipe, "output": {"path": str(out)}}, work, f"stores-{name}", env)
            print(f"task arithmetic from {name}: wall {result['wall']:.1f} s, merge "
                  f"{result['merge']:.1f} s, {total / result['merge'] / 1e9:.2f} GB/s of "
                  "sources (merge time)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
