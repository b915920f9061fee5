"""One GPU: AXIS+SVC source throughput on synthetic fine-tunes of a ~1B-shaped Llama, the CUDA
path checked against the CPU path, and exact vs randomized SVD timings. One run, < 5 minutes.

    python benchmarks/gpu_axis_svc.py --work /tmp/raymerge-gpu

Ray is not needed: units run through `merge_unit` (what each Ray task runs) on a thread pool that
shares the GPU, so the figure is the per-GPU merge throughput a Ray task pool gets on one device.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from raymerge.execute import MergeJob, merge_unit
from raymerge.methods import MergeOptions
from raymerge.plan import make_plan
from raymerge.recipe import method_settings
from raymerge.sources import Checkpoint
from raymerge.spectral.svd import exact_svd, randomized_svd
from raymerge.synthetic import llama_config, llama_shapes

ONE_B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=16, vocab_size=32000)
TINY = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)


DEVICE = "cuda"


def generate(root: Path, dims: dict, sources: int, seed: int = 0) -> tuple[Path, list[Path]]:
    """Base + fine-tunes (low rank + noise deltas) in bfloat16, drawn on the GPU."""
    config = llama_config(dtype="bfloat16", **dims)
    shapes = llama_shapes(config)
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    base = {}
    for name, shape in shapes.items():
        base[name] = (torch.ones(shape, device=DEVICE) if len(shape) == 1 else
                      torch.randn(shape, device=DEVICE, generator=generator) * shape[-1] ** -0.5)
    paths = []
    for index in range(sources + 1):
        directory = root / ("base" if index == 0 else f"ft-{index - 1}")
        paths.append(directory)
        if (directory / "model.safetensors").exists():
            continue
        tensors = {}
        for name, weight in base.items():
            if index and weight.dim() == 2:
                rows, cols = weight.shape
                low_rank = torch.randn(rows, 8, device=DEVICE, generator=generator) @ \
                    torch.randn(8, cols, device=DEVICE, generator=generator)
                weight = weight + 0.05 * low_rank / (8 * cols) ** 0.5 + 0.002 * torch.randn(
                    weight.shape, device=DEVICE, generator=generator)
            tensors[name] = weight.to(torch.bfloat16).cpu().contiguous()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(config))
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return paths[0], paths[1:]


def job_for(base: Path, sources: list[Path], method: dict, device: str, svc: bool,
            threads: int, output_dtype: str | None = None) -> tuple[MergeJob, object]:
    base_checkpoint = Checkpoint.open("base", base)
    checkpoints = [Checkpoint.open(str(p), p) for p in sources]
    plan = make_plan(base_checkpoint, checkpoints, output_dtype=output_dtype, passes=1 + svc)
    job = MergeJob(base=base_checkpoint, sources=checkpoints, weights=[1.0] * len(sources),
                   method=method_settings(method), options=MergeOptions(svd="auto"),
                   svc_alpha=1.0 / len(sources) if svc else None, device=device,
                   num_threads=threads)
    return job, plan


def run_all(job: MergeJob, plan, workers: int) -> tuple[float, dict]:
    started = time.perf_counter()
    outputs = {}
    with ThreadPoolExecutor(workers) as pool:
        for _stats, payload in pool.map(lambda unit: _on_own_stream(job, unit),
                                        plan.largest_first()):
            outputs.update(payload["tensors"])
    _synchronize()
    return time.perf_counter() - started, outputs


def _on_own_stream(job: MergeJob, unit):
    """Each thread on its own CUDA stream, as separate Ray task processes would be."""
    if DEVICE != "cuda":
        return merge_unit(job, unit)
    with torch.cuda.stream(torch.cuda.Stream()):
        return merge_unit(job, unit)


def warm_up_linear_algebra() -> None:
    """torch initialises its CUDA linear-algebra backends lazily and not thread-safely: touch
    each once on the main thread before worker threads call them."""
    matrix = torch.randn(64, 32, device=DEVICE)
    torch.linalg.cholesky_ex(matrix.mT @ matrix)
    torch.linalg.qr(matrix)
    torch.linalg.svd(matrix, full_matrices=False)
    randomized_svd(matrix, 4)
    exact_svd(matrix)


def _synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def compare_devices(root: Path) -> list[str]:
    base, sources = generate(root / "tiny", TINY, 4, seed=1)
    lines = []
    for method, svc in [("task_arithmetic", False), ("ties", False), ("axis", True),
                        ("tsv", True), ("iso_c", False), ("iso_cts", True)]:
        settings = {"name": method, **{"axis": {"k": 0.25}, "ties": {"density": 0.5}}.get(
            method, {})}
        results = {}
        for device in ("cpu", DEVICE):
            job, plan = job_for(base, sources, settings, device, svc, threads=4,
                                output_dtype="F32")
            results[device] = {name: torch.from_numpy(a.copy()).double()
                               for name, a in run_all(job, plan, 1)[1].items()}
        base_tensors = {n: t.double() for n, t in _load(base / "model.safetensors").items()}
        worst = max(
            float((results[DEVICE][n] - results["cpu"][n]).norm()
                  / max(float((results["cpu"][n] - base_tensors[n]).norm()), 1e-12))
            for n in results["cpu"])
        lines.append(f"  {method}{'+svc' if svc else ''}: max relative difference of the merged "
                     f"delta, {DEVICE} vs cpu (float32 output): {worst:.2e}")
    return lines


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def svd_timings(rows: int, cols: int) -> list[str]:
    lines = []
    matrix = torch.randn(rows, cols, device=DEVICE)
    rank = min(rows, cols) // 10
    for label, fn in [("exact", lambda: exact_svd(matrix)),
                      (f"randomized rank {rank}", lambda: randomized_svd(matrix, rank))]:
        fn()
        _synchronize()
        started = time.perf_counter()
        for _ in range(3):
            fn()
        _synchronize()
        milliseconds = (time.perf_counter() - started) / 3 * 1e3
        lines.append(f"  {label} SVD of {rows}x{cols} float32: {milliseconds:.1f} ms")
    if DEVICE == "cuda":
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False, driver="gesvda")
        residual = torch.linalg.matrix_norm(matrix - (U * S) @ Vh) / torch.linalg.matrix_norm(
            matrix)
        lines.append(f"  gesvda relative reconstruction residual: {float(residual):.1e} "
                     "(exact_svd keeps gesvda below 1e-4)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/raymerge-gpu")
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (a check "
                        "of this script where there is no GPU; its figures mean nothing)")
    args = parser.parse_args()
    global DEVICE
    dims = ONE_B
    if args.smoke:
        DEVICE, dims = "cpu", TINY
    root = Path(args.work)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    base, sources = generate(root / "one-b", dims, args.sources)
    source_bytes = sum((p / "model.safetensors").stat().st_size for p in sources)
    print(f"generated {len(sources)} sources of {source_bytes / len(sources) / 1e9:.2f} GB "
          f"in {time.perf_counter() - started:.0f} s", flush=True)
    warm_up_linear_algebra()
    for svd_line in svd_timings(dims["hidden_size"], dims["intermediate_size"]):
        print(svd_line, flush=True)
    runs = [("axis", True, args.workers), ("axis", True, 2 * args.workers),
            ("task_arithmetic", False, args.workers)]
    for method, svc, workers in runs:
        job, plan = job_for(base, sources, {"name": method, "k": 0.1}, DEVICE, svc,
                            threads=max(1, 16 // workers))
        seconds, _ = run_all(job, plan, workers)
        print(f"{method}{'+svc' if svc else ''}, {workers} units at a time: {seconds:.1f} s for "
              f"{len(plan.units)} units; "
              f"source checkpoints {source_bytes / seconds / 1e9:.2f} GB/s; "
              f"bytes read (all passes) {plan.read_bytes / seconds / 1e9:.2f} GB/s", flush=True)
    print(f"{DEVICE} vs cpu on a tiny Llama, 4 sources:", flush=True)
    for line in compare_devices(root):
        print(line, flush=True)


if __name__ == "__main__":
    main()
