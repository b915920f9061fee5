"""The GPU path in one go, on one H100/H200 (about 10 minutes):

1. The read race: TensorReader on cuda over tensors of at least 4 slices while the stream is kept
   busy (torch.cuda._sleep queued between reads, so each host-to-device copy runs late), the bytes
   compared with the CPU reader bit for bit.
2. `raymerge merge` through Ray on 7B-shaped synthetic sources (hidden 4096, intermediate 14336)
   with task arithmetic, TIES, AXIS+SVC and WUDI, at num_gpus 1 and 0.25, each output compared
   with the same merge on the CPU (runtime.device: cpu); source GB/s per GPU (merge time); each
   merge's peak device memory against the plan's estimate.

    python benchmarks/gpu_check.py --work /tmp/rm-gpu          # on the GPU machine
    python benchmarks/gpu_check.py --work /tmp/rm-cpu --cpu    # the same steps on the CPU, tiny

With --cpu the race runs with a copier that completes copies late on another thread (the test
suite's), and the merges run with runtime.device: cpu on both sides (so they agree exactly).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raymerge.reading import TensorReader
from raymerge.sources.checkpoint import Checkpoint
from raymerge.synthetic import llama_config, write_family

SEVEN_B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96)
METHODS = {"task_arithmetic": {"method": {"name": "task_arithmetic"}},
           "ties": {"method": {"name": "ties", "density": 0.2}},
           "axis+svc": {"method": {"name": "axis", "k": 0.1},
                        "calibrate": {"svc": {"alpha": "auto"}}},
           "wudi": {"method": {"name": "wudi", "iter_num": 30}}}
# GPU against CPU, max |difference| relative to max |output|: float32 kernels differ in rounding;
# the randomized SVD draws its sketch on each device, so AXIS agrees to its stated accuracy.
TOLERANCE = {"task_arithmetic": 1e-6, "ties": 1e-6, "axis+svc": 5e-3, "wudi": 1e-4}


def late_copier():
    """On the CPU: copies that complete late, on another thread (what a busy stream does)."""
    threads = []

    def copy(host):
        target = torch.empty_like(host)

        def late():
            time.sleep(0.003)
            target.copy_(host)

        thread = threading.Thread(target=late)
        thread.start()
        threads.append(thread)
        return target, thread.join

    return copy, threads


def check_race(work: Path, cpu: bool) -> str:
    rows, columns = (4096, 14336) if not cpu else (64, 4096)
    directory = work / "race"
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    save_file({f"t{i}": torch.randn(rows, columns, generator=generator).to(torch.bfloat16)
               for i in range(3)}, directory / "model.safetensors")
    checkpoint = Checkpoint.open("race", directory)
    expected = load_file(directory / "model.safetensors")
    slice_bytes = 32 << 20 if not cpu else 64 << 10
    copier, threads = late_copier() if cpu else (None, [])
    device = "cpu" if cpu else "cuda"
    slices = 0
    with TensorReader(device, copier=copier, slice_bytes=slice_bytes) as reader:
        for name in expected:
            parts = []
            for _, part in reader.slices(checkpoint, name):
                if not cpu:
                    torch.cuda._sleep(20_000_000)  # the stream busy: this copy runs late
                parts.append(part.clone() if not cpu else part)
                slices += 1
            for thread in threads:
                thread.join()
            got = torch.cat(parts).cpu()
            if not torch.equal(got.view(torch.int16), expected[name].reshape(-1).view(torch.int16)):
                raise SystemExit(f"race check FAILED on {name}: bytes differ from the CPU read")
    return f"race: {len(expected)} tensors, {slices} slices, bit-identical to the CPU read"


def family(work: Path, shapes: dict, count: int) -> tuple[Path, list[Path]]:
    return write_family(work / "family", llama_config(dtype="bfloat16", **shapes), count)


def merge(work: Path, name: str, recipe: dict) -> dict:
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    run = subprocess.run([sys.executable, "-m", "raymerge.cli", "merge", str(path),
                          "--no-progress", "--json"], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{name}: {run.stderr[-2000:]}")
    manifest = json.loads((Path(recipe["output"]["path"]) / "raymerge_manifest.json").read_text())
    return manifest["summary"]


def difference(left: Path, right: Path) -> float:
    worst = 0.0
    for file in sorted(left.glob("model*.safetensors")):
        a, b = load_file(file), load_file(right / file.name)
        for name in a:
            x, y = a[name].double(), b[name].double()
            worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/rm-gpu-check")
    parser.add_argument("--cpu", action="store_true", help="the same steps on the CPU, tiny")
    parser.add_argument("--sources", type=int, default=4)  # the CPU reference bounds the time
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    print(f"command: {' '.join(sys.argv)}")
    print(check_race(work, args.cpu), flush=True)
    base, sources = family(work, TINY if args.cpu else SEVEN_B, args.sources)
    source_bytes = sum(f.stat().st_size for s in sources for f in s.glob("*.safetensors"))
    for method in args.methods:
        common = {"base": str(base), "sources": [str(s) for s in sources], **METHODS[method],
                  "output": {"dtype": "float32"}}
        reference = {**common, "runtime": {"device": "cpu", "num_gpus": 0},
                     "output": {"path": str(work / f"{method}-cpu"), "dtype": "float32"}}
        merge(work, f"{method}-cpu", reference)
        for num_gpus in (1, 0.25):
            device = "cpu" if args.cpu else "cuda"
            runtime = {"device": device, "num_gpus": 0 if args.cpu else num_gpus}
            out = work / f"{method}-gpu-{num_gpus}"
            summary = merge(work, f"{method}-gpu-{num_gpus}", {
                **common, "runtime": runtime, "output": {"path": str(out), "dtype": "float32"}})
            worst = difference(out, work / f"{method}-cpu")
            verdict = "ok" if worst <= TOLERANCE[method] else "ABOVE TOLERANCE"
            print(f"{method}, num_gpus {num_gpus}: {summary['max_in_flight']} in flight, merge "
                  f"{summary['seconds']:.1f} s = {source_bytes / summary['seconds'] / 1e9:.2f} "
                  f"GB/s of sources; peak device memory "
                  f"{summary.get('peak_device_bytes_measured', 0) / 2**30:.2f} GiB measured, "
                  f"{summary['peak_device_bytes_estimated'] / 2**30:.2f} GiB planned per task; "
                  f"vs CPU {worst:.2e} ({verdict})", flush=True)


if __name__ == "__main__":
    main()
