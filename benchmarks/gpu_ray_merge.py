"""`raymerge merge` through Ray on one GPU: task arithmetic and AXIS+SVC over synthetic fine-tunes
of a 7B-shaped Llama (hidden 4096, intermediate 14336, 32 heads, 8 KV heads), one and several
tasks per GPU (runtime.num_gpus 1 and 0.25), against the thread-pool figure of
`benchmarks/gpu_axis_svc.py` in the same run and the cold and warm read speed of the same files;
the GPU output checked against the CPU path on one unit; one `raymerge tune` step on the GPU.
One prepared run, about 10 minutes on an H200 with the defaults:

    python benchmarks/gpu_ray_merge.py --work /tmp/rm-gpu            # GPU machine
    python benchmarks/gpu_ray_merge.py --work /tmp/rm-cpu --cpu      # the same steps on the CPU,
                                                                     # tiny shapes (a check)

Prints one line per figure and writes them to --report (JSON) as well.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu_axis_svc  # noqa: E402  (the thread-pool path and the synthetic family)

SEVEN_B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=6,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96)
RAYMERGE = [sys.executable, "-m", "raymerge.cli"]
# GPU against CPU on one unit, relative Frobenius difference of the merged delta: float32
# outputs; the randomized SVD draws its sketch on each device (different draws), so AXIS
# agrees to the randomized path's documented accuracy, not to rounding.
TOLERANCE = {"task_arithmetic": 1e-5, "axis+svc": 5e-3}


def log(report: dict, key: str, line: str, value=None) -> None:
    print(line, flush=True)
    report[key] = value if value is not None else line


def read_speed(files: list[Path], cold: bool) -> float:
    """GB/s reading the files once, after asking the kernel to drop them from the page cache
    (posix_fadvise DONTNEED: clean pages go, no privilege needed) when `cold`."""
    total = 0
    if cold:
        os.sync()
        for path in files:
            with open(path, "rb") as handle:
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    started = time.perf_counter()
    buffer = bytearray(64 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
    return total / (time.perf_counter() - started) / 1e9


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer (w0 … wN) so the merged checkpoint can be tuned on text."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"[UNK]": vocab_size - 1}
    word_level = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]",
                            eos_token="w1").save_pretrained(directory)


def ray_merge(recipe: dict, work: Path, name: str) -> dict:
    """`raymerge merge --json` in a subprocess (its own private Ray cluster, as a user runs it);
    the final JSON record plus the wall time."""
    path = work / f"{name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    started = time.perf_counter()
    run = subprocess.run([*RAYMERGE, "merge", str(path), "--no-progress", "--json"],
                         capture_output=True, text=True)
    wall = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"{name} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    record = json.loads(run.stdout.strip().splitlines()[-1])
    manifest = json.loads((Path(recipe["output"]["path"]) / "raymerge_manifest.json").read_text())
    return {**record, "wall": wall, "merge_seconds": manifest["summary"]["seconds"]}


def compare_unit(base: Path, sources: list[Path], merged: Path, method: dict, svc: bool,
                 device: str) -> float:
    """One unit (layer 0) merged again on the CPU; max relative difference of the merged delta
    against the output the device wrote."""
    from safetensors import safe_open

    job, plan = gpu_axis_svc.job_for(base, sources, method, "cpu", svc, threads=os.cpu_count(),
                                     output_dtype="F32")
    unit = next(u for u in plan.units if u.name.endswith("layers.0"))
    _, payload = gpu_axis_svc.merge_unit(job, unit)
    index = json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"]
    worst = 0.0
    for name, cpu_array in payload["tensors"].items():
        with safe_open(merged / index[name], "pt") as handle:
            on_device = handle.get_tensor(name).double()
        with safe_open(base / "model.safetensors", "pt") as handle:
            base_tensor = handle.get_tensor(name).double()
        cpu_delta = torch.from_numpy(cpu_array.copy()).double() - base_tensor
        difference = (on_device - base_tensor - cpu_delta).norm() / cpu_delta.norm().clamp(
            min=1e-12)
        worst = max(worst, float(difference))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/rm-gpu")
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--layers", type=int, default=6,
                        help="7B-shaped layers (0.44 GB of bfloat16 each per source; the "
                        "defaults take about 45 GB of disk with the outputs)")
    parser.add_argument("--cpu", action="store_true",
                        help="tiny shapes and runtime.device: cpu (checks the script; no GPU)")
    parser.add_argument("--report", default=None, help="JSON file for the figures")
    args = parser.parse_args()
    device = "cpu" if args.cpu else "cuda"
    gpu_axis_svc.DEVICE = device
    dims = dict(TINY) if args.cpu else dict(SEVEN_B, num_hidden_layers=args.layers)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"command": " ".join(sys.argv)}
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    log(report, "device", f"device: {name}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs", name)

    started = time.perf_counter()
    base, sources = gpu_axis_svc.generate(work / "family", dims, args.sources)
    write_tokenizer(base, dims["vocab_size"])
    files = [path / "model.safetensors" for path in sources]
    source_bytes = sum(path.stat().st_size for path in files)
    log(report, "generated", f"generated {len(sources)} sources, {source_bytes / 1e9:.2f} GB in "
        f"all, in {time.perf_counter() - started:.0f} s", source_bytes)
    log(report, "read_cold_gbps", f"read the sources cold: {read_speed(files, True):.2f} GB/s")
    warm = read_speed(files, False)
    log(report, "read_warm_gbps", f"read the sources warm (page cache): {warm:.2f} GB/s", warm)

    gpus = {"num_gpus": 0, "device": "cpu"} if args.cpu else {"num_gpus": 1}
    shared = {"num_gpus": 0, "device": "cpu"} if args.cpu else {"num_gpus": 0.25}
    axis_svc = {"method": {"name": "axis", "k": 0.1}, "calibrate": {"svc": {"alpha": "auto"}}}
    runs = [  # (label, method, runtime, tasks in flight, output dtype: float32 to compare)
        ("task_arithmetic", {"method": {"name": "task_arithmetic"}}, gpus, 2, "float32"),
        ("axis+svc", axis_svc, gpus, 2, "float32"),
        ("axis+svc", axis_svc, shared, 4, "bfloat16"),
    ]
    outputs = {}
    for label, method, runtime, in_flight, dtype in runs:
        out = work / f"out-{label}-{runtime['num_gpus']}-{in_flight}"
        shutil.rmtree(out, ignore_errors=True)
        record = ray_merge({"base": str(base), "sources": [str(p) for p in sources], **method,
                            "output": {"path": str(out), "dtype": dtype},
                            "runtime": {**runtime, "max_in_flight": in_flight,
                                        "num_cpus": 1}}, work, f"{label}-{in_flight}")
        if label in outputs:
            shutil.rmtree(out)  # disk: only the float32 outputs are kept, for the comparison
        outputs.setdefault(label, out)
        gbps = source_bytes / record["merge_seconds"] / 1e9
        log(report, f"ray_{label}_{runtime['num_gpus']}",
            f"Ray, {label}, num_gpus {runtime['num_gpus']}, {in_flight} tasks in flight: merge "
            f"{record['merge_seconds']:.1f} s ({gbps:.2f} GB/s of sources), wall "
            f"{record['wall']:.1f} s", gbps)

    gpu_axis_svc.warm_up_linear_algebra()
    for label, method, svc in [("task_arithmetic", {"name": "task_arithmetic"}, False),
                               ("axis+svc", {"name": "axis", "k": 0.1}, True)]:
        job, plan = gpu_axis_svc.job_for(base, sources, method, device, svc, threads=4)
        seconds, _ = gpu_axis_svc.run_all(job, plan, 4)
        log(report, f"threads_{label}", f"thread pool (gpu_axis_svc.py's path), {label}, 4 units "
            f"at a time: {seconds:.1f} s ({source_bytes / seconds / 1e9:.2f} GB/s of sources)",
            source_bytes / seconds / 1e9)

    for label, method, svc in [("task_arithmetic", {"name": "task_arithmetic"}, False),
                               ("axis+svc", {"name": "axis", "k": 0.1}, True)]:
        difference = compare_unit(base, sources, outputs[label], method, svc, device)
        verdict = "within" if difference <= TOLERANCE[label] else "OUTSIDE"
        log(report, f"cpu_vs_{device}_{label}", f"{label}: {device} output vs the CPU path on "
            f"layer 0, max relative difference of the merged delta {difference:.2e} ({verdict} "
            f"the tolerance {TOLERANCE[label]:g})", difference)

    data = work / "tune.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{(i + j) % 90}" for j in range(40))})
                            + "\n" for i in range(64)))
    import yaml

    tune = work / "tune.yaml"
    tune.write_text(yaml.safe_dump({
        "merged": str(outputs["axis+svc"]), "base": str(base),
        "data": {"train": str(data), "eval_fraction": 0.25}, "n": 0.5, "epochs": 1,
        "max_steps": 1, "batch_size": 4, "seq_len": 32, "num_workers": 1,
        "use_gpu": not args.cpu, "output": str(work / "tuned"),
        "storage_path": str(work / "tune-runs")}))
    shutil.rmtree(work / "tuned", ignore_errors=True)
    started = time.perf_counter()
    run = subprocess.run([*RAYMERGE, "tune", str(tune)], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"tune failed ({run.returncode}):\n{run.stderr[-3000:]}")
    log(report, "tune", f"raymerge tune, one step, use_gpu {not args.cpu}: "
        f"{run.stdout.strip().splitlines()[-1]} ({time.perf_counter() - started:.0f} s wall)")
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
