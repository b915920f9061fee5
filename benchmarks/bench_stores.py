"""Sources and outputs in object storage against local disk, on a local SeaweedFS S3 server (the
one the tests use): fetch throughput of one task's reader with 1 and with k range requests in
flight, the small family's merge from S3 against from local directories, the driver's time
before the first task (resolve, validate, plan) for both; and the merge of local sources into an
S3 output against into a local directory (wall time, bytes the writer's node uploaded, the most
local disk its staging held).

    python benchmarks/bench_stores.py [--size small] [--sources 8] [--in-flight 1 4 8]
                                      [--part sources outputs] [--shard-size 20MB]

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


def merge(recipe: dict, work: Path, name: str, env: dict, watch: Path | None = None) -> dict:
    """One `raymerge merge` in a fresh process; with `watch`, the most bytes that directory
    held while it ran (sampled every 0.2 s)."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "raymerge.cli", "merge", str(path),
                                "--no-progress", "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    while process.poll() is None:
        if watch is not None:
            peak = max(peak, disk_bytes(watch))
        time.sleep(0.2)
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(stderr[-2000:])
    record = json.loads(stdout.strip().splitlines()[-1])
    return {"wall": time.perf_counter() - started, "merge": record["seconds"],
            "output_bytes": record["output_bytes"], "peak_staging": peak}


def disk_bytes(directory: Path) -> int:
    """Bytes allocated under a directory now (sparse shards count what is written)."""
    total = 0
    for path in directory.rglob("*"):
        try:
            total += path.stat().st_blocks * 512 if path.is_file() else 0
        except OSError:  # removed while we looked
            pass
    return total


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
    parser.add_argument("--part", nargs="+", default=["sources", "outputs"],
                        choices=["sources", "outputs"])
    parser.add_argument("--shard-size", default="20MB", help="the outputs' shards")
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
        if "outputs" in args.part:
            outputs(server, base, sources, work, env, args.shard_size)
        if "sources" not in args.part:
            return
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


def outputs(server: SeaweedS3, base: Path, sources: list[Path], work: Path, env: dict,
            shard_size: str) -> None:
    """Local sources merged into a local directory, then into an S3 prefix: shards go up from
    the writer's node as they are finished; its staging disk holds only the shards being
    filled."""
    from pyarrow import fs

    server.make_bucket("outputs")
    staging = Path(tempfile.mkdtemp(prefix="rm-bench-staging-"))
    recipe = {"base": str(base), "sources": [str(s) for s in sources],
              "method": {"name": "task_arithmetic"}, "storage": {"endpoint": server.endpoint_url}}
    for name, path in (("local disk", str(work / "out-stores-output-local")),
                       ("S3", "s3://outputs/bench/merged")):
        result = merge({**recipe, "output": {"path": path, "shard_size": shard_size}}, work,
                       "stores-output", {**env, "RAYMERGE_STAGING": str(staging)},
                       watch=staging if path.startswith("s3://") else None)
        stored = sum(info.size for info in server.filesystem().get_file_info(fs.FileSelector(
            "outputs/bench/merged", recursive=True, allow_not_found=True))
            if info.type == fs.FileType.File)
        print(f"task arithmetic into {name}: wall {result['wall']:.1f} s, merge "
              f"{result['merge']:.1f} s, output {result['output_bytes'] / 1e6:.0f} MB in "
              f"{shard_size} shards" + (
                  f"; uploaded from the writer's node {stored / 1e6:.0f} MB, its staging disk "
                  f"held at most {result['peak_staging'] / 1e6:.0f} MB"
                  if path.startswith("s3://") else ""))


if __name__ == "__main__":
    main()
