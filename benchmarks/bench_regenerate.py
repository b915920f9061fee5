"""Regeneration after one new fine-tune lands, against a merge from scratch: 8 synthetic
fine-tunes of the ~150M Llama (bfloat16) plus a 9th, AXIS and AXIS+SVC, with the factor cache.

    python benchmarks/bench_regenerate.py

For each method: (1) regenerate the 8-source model with an empty factor cache; (2) add the 9th
source and regenerate (only its SVDs are computed); (3) regenerate again with nothing changed
(skipped); (4) the 9-source model from scratch with an empty cache. (2) and (4) must give the
same bytes. Runs on a cluster started beforehand (`ray start --head`), sources in the page cache
and their sha256s remembered, so the figures compare the merge work itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from bench_vs_mergekit import make_sources, running_cluster, warm_page_cache

METHODS = {
    "axis": {"method": {"name": "axis", "k": 0.1}},
    "axis+svc": {"method": {"name": "axis", "k": 0.1}, "calibrate": {"svc": {"alpha": "auto"}}},
}


def regenerate(registry: Path, env: dict) -> tuple[dict, float]:
    started = time.perf_counter()
    run = subprocess.run(["raymerge", "regenerate", str(registry), "--json"], env=env,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        sys.exit(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[0]), seconds


def write_registry(work: Path, name: str, settings: dict, base: Path, sources: list[Path],
                   out: Path, cache: Path) -> Path:
    recipe = {"base": str(base), "sources": [str(p) for p in sources], **settings,
              "output": {"path": str(out)}, "runtime": {"max_in_flight": 2}}
    path = work / f"registry-{name}.yaml"
    path.write_text(yaml.safe_dump({"factor_cache": str(cache),
                                    "models": [{"name": name, "recipe": recipe}]}))
    return path


def shards_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def main() -> None:
    work = Path("benchmarks/work").resolve()
    base, sources = make_sources(work, 9)
    warm_page_cache([base, *sources])
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    print(f"command: {' '.join(sys.argv)}")
    rows = []
    with running_cluster(env):
        for name, settings in METHODS.items():
            cache, scratch_cache = work / f"cache-{name}", work / f"cache-{name}-scratch"
            out, scratch_out = work / f"out-regen-{name}", work / f"out-regen-{name}-scratch"
            for path in (cache, scratch_cache, out, scratch_out):
                shutil.rmtree(path, ignore_errors=True)
            steps = [("8 sources, empty cache", sources[:8], out, cache),
                     ("9th source added", sources, out, cache),
                     ("nothing changed", sources, out, cache),
                     ("9 sources from scratch", sources, scratch_out, scratch_cache)]
            for label, chosen, target, cache_dir in steps:
                registry = write_registry(work, name, settings, base, chosen, target, cache_dir)
                record, seconds = regenerate(registry, env)
                rows.append({"method": name, "step": label, "status": record["status"],
                             "wall_s": round(seconds, 1),
                             "merge_s": round(record.get("seconds", 0.0), 1),
                             "hits": record.get("factor_cache_hits", 0),
                             "misses": record.get("factor_cache_misses", 0)})
                print(json.dumps(rows[-1]), flush=True)
            same = shards_digest(out) == shards_digest(scratch_out)
            print(f"{name}: incremental and scratch outputs byte-identical: {same}", flush=True)
    print("| method | step | status | wall s | merge s | cache hits | cache misses |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['method']} | {row['step']} | {row['status']} | {row['wall_s']} | "
              f"{row['merge_s']} | {row['hits']} | {row['misses']} |")


if __name__ == "__main__":
    main()
