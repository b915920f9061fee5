"""One task's peak memory does not grow with the number of sources (measured in subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from raymerge.synthetic import llama_config, write_base, write_finetune

# Run merge_unit on the block unit in a fresh interpreter, with 2 sources then with 12; report the
# peak RSS each added (Linux: VmHWM after resetting it through /proc/self/clear_refs).
_MEASURE = r"""
import json, sys
from pathlib import Path
import torch
from raymerge.execute import MergeJob, merge_unit
from raymerge.plan import make_plan
from raymerge.recipe import method_settings
from raymerge.sources import Checkpoint

base_dir, method_json, calibrate, *source_dirs = sys.argv[1:]
base = Checkpoint.open("base", Path(base_dir))
def status_kib(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024
added = {}
for count in (2, len(source_dirs)):
    sources = [Checkpoint.open(d, Path(d)) for d in source_dirs[:count]]
    plan = make_plan(base, sources, output_dtype=None, state_tensors=4)
    unit = next(u for u in plan.units if u.name == "model.layers.0")
    job = MergeJob(base=base, sources=sources, weights=[1.0] * len(sources),
                   method=method_settings(json.loads(method_json)),
                   svc_alpha=1 / len(sources) if calibrate == "svc" else None, num_threads=1)
    merge_unit(job, min(plan.units, key=lambda u: u.read_bytes))  # warm up on the smallest unit
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM) to now
    before = status_kib("VmRSS")
    merge_unit(job, unit)
    added[count] = status_kib("VmHWM") - before
one_source = unit.read_bytes // (len(sources) + 1)
print(json.dumps({"two": added[2], "twelve": added[len(source_dirs)],
                  "unit_source_bytes": one_source}))
"""


@pytest.fixture(scope="module")
def twelve_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    # One block of 4 MiB matrices: 16 MiB of float32 per source for the unit.
    config = llama_config(hidden_size=512, intermediate_size=2048, num_hidden_layers=1,
                          num_attention_heads=8, num_key_value_heads=8, vocab_size=64)
    base = write_base(root / "base", config)
    return base, [write_finetune(base, root / f"ft-{i}", seed=i) for i in range(12)]


# settings that make each method do its work (mergekit's density 1.0 would keep everything);
# WUDI's state is fixed once its pass is done: a few Adam steps measure it as well as 300
_SETTINGS = {"ties": {"density": 0.3}, "della": {"density": 0.3}, "sce": {"select_topk": 0.3},
             "wudi": {"iter_num": 3}}


def _peak_added(base, sources, method: str, calibrate: str = "") -> dict:
    # Fixed glibc mmap threshold: every large buffer is mapped and unmapped on its own, so the
    # peak reflects what is alive, not how the heap happened to fragment.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(base),
         json.dumps({"name": method, **_SETTINGS.get(method, {})}), calibrate, *map(str, sources)],
        capture_output=True, text=True, check=True, env=env,
    )
    return json.loads(result.stdout)


@pytest.mark.parametrize("method, calibrate", [
    ("ties", ""), ("task_arithmetic", ""), ("dare", ""),
    ("axis", "svc"), ("tsv", ""), ("iso_cts", "svc"),
    ("karcher", ""), ("model_stock", ""), ("ramplus_tl", ""),
    ("della", ""), ("sce", ""),  # DELLA's row ranks and draws; SCE's three passes
    ("wudi", "svc"), ("star", ""), ("ace", ""),
])
def test_task_peak_memory_does_not_grow_with_sources(twelve_sources, method, calibrate):
    base, sources = twelve_sources
    measured = _peak_added(base, sources, method, calibrate)
    # Holding every source would add 10 more sources' worth (160 MiB) going from 2 to 12.
    assert measured["twelve"] - measured["two"] < 0.5 * measured["unit_source_bytes"], measured
