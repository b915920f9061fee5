"""Merge one work unit: stream the sources' tensors one at a time through a method.

Plain Python, no Ray: the distributed layer wraps `merge_unit` with `ray.remote`, tests call it
directly."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from raymerge.errors import ClusterError, SourceError
from raymerge.factor_cache import FactorCache, FactorCacheSpec
from raymerge.memory import PeakMemory
from raymerge.methods import MergeOptions, Method, build_method
from raymerge.plan import TensorTask, WorkUnit, check_fits
from raymerge.settings import MethodSettings, settings_for_tensor
from raymerge.sources.checkpoint import Checkpoint
from raymerge.sources.lora import LoraAdapter
from raymerge.tensor_bits import TORCH_DTYPES, to_numpy_bits

READ_CHUNK_ELEMENTS = 1 << 20  # rows are read from the mapped file about this many at a time
GPU_READ_CHUNK_ELEMENTS = 1 << 24  # fewer, larger host-to-device copies


@dataclass(frozen=True)
class MergeJob:
    """Everything a task needs besides its unit; small (paths and headers), shared by all tasks."""

    base: Checkpoint
    sources: list[Checkpoint | LoraAdapter]
    weights: list[Any]  # w_i: numbers, or gradients / filter lists resolved per tensor
    method: MethodSettings  # as the recipe gives it; resolved per tensor
    options: MergeOptions = MergeOptions()
    svc_alpha: float | None = None  # calibrate with SVC when set
    compute_dtype: str = "float32"
    device: str = "cpu"
    num_threads: int | None = None
    factor_cache: FactorCacheSpec | None = None  # per-source spectral factors across merges
    memory: int | None = None  # bytes the task asked Ray for; a unit that cannot fit is refused
    source_parameters: list[dict[str, Any]] | None = None  # each source's own method keys

    def method_for(self, tensor: TensorTask, options: MergeOptions) -> Method:
        """The method for one tensor, its settings resolved at the tensor's name and layer."""
        settings, source_settings, weights = settings_for_tensor(
            self.method, self.source_parameters or [{}] * len(self.sources), self.weights,
            tensor.name, tensor.layer_position)
        return build_method(settings, weights, options, self.svc_alpha, source_settings,
                            tensor=(tensor.name, tensor.shape))


def merge_unit(job: MergeJob, unit: WorkUnit) -> tuple[dict[str, Any], dict[str, Any]]:
    """Small statistics about one unit, and its payload for the writer: the merged tensors
    (numpy, exact output bytes) and, for methods that have them, the factors U, σ, V of each
    merged delta (numpy, compute dtype)."""
    check_fits(unit, job.memory)  # before allocating anything
    if job.num_threads:
        torch.set_num_threads(job.num_threads)
    started = time.perf_counter()
    outputs: dict[str, np.ndarray] = {}
    factors: dict[str, dict[str, np.ndarray]] = {}
    tensor_stats: dict[str, dict[str, Any]] = {}
    with PeakMemory() as memory, torch.inference_mode():
        cache = FactorCache(job.factor_cache) if job.factor_cache else None
        options = replace(job.options, factor_cache=cache)
        for tensor in unit.tensors:
            method = job.method_for(tensor, options)
            try:
                merged, tensor_stats[tensor.name] = _merge_tensor(
                    job, method, tensor.name, TORCH_DTYPES[tensor.output_dtype])
            except torch.cuda.OutOfMemoryError:
                raise ClusterError(out_of_gpu_memory(unit, tensor.name)) from None
            outputs[tensor.name] = to_numpy_bits(merged)
            del merged
            for suffix, part_stats in method.report.parts.items():  # an expert stack's slices
                tensor_stats[tensor.name + suffix] = part_stats
            if method.report.save_factors and method.report.factors is not None:
                factors[tensor.name] = dict(zip("USV", map(to_numpy_bits, method.report.factors)))
    stats = {
        "unit": unit.index,
        "name": unit.name,
        "read_bytes": unit.read_bytes,
        "seconds": time.perf_counter() - started,
        "peak_bytes": memory.peak_bytes,
        "tensors": tensor_stats,
        "factor_cache_hits": cache.hits if cache else 0,
        "factor_cache_misses": cache.misses if cache else 0,
    }
    return stats, {"unit": unit.index, "tensors": outputs, "factors": factors}


def out_of_gpu_memory(unit: WorkUnit, tensor_name: str) -> str:
    from raymerge.sizes import format_size

    return (f"unit {unit.name}: the GPU ran out of memory merging tensor {tensor_name} (about "
            f"{format_size(unit.peak_bytes)} per task estimated); give each task more of the GPU "
            "(a larger runtime.num_gpus: fewer tasks share it), lower runtime.max_in_flight, or "
            "merge on the CPU (runtime.device: cpu)")


def _merge_tensor(job: MergeJob, method: Method, name: str, output_dtype: torch.dtype):
    compute_dtype = TORCH_DTYPES["F64" if job.compute_dtype == "float64" else "F32"]
    base = torch.empty(job.base.tensors[name].shape, dtype=compute_dtype, device=job.device)
    _read_into(base, job.base, name)
    delta = torch.empty_like(base)  # one buffer for every source: no allocation per source
    method.begin(name, base)  # sets the number of passes this tensor needs
    for pass_index in range(method.passes):
        for source_index, source in enumerate(job.sources):
            if isinstance(source, LoraAdapter):
                _update_from_lora(method, pass_index, source_index, source, name, delta)
            elif method.cached_update(pass_index, source_index):
                continue  # this source's factors came from the cache: nothing to read
            else:
                _read_into(delta, source, name, minus=base)
                method.update(pass_index, source_index, delta)
    del delta
    merged_delta = method.finish()
    if not method.applies_scale:
        merged_delta.mul_(method.settings.scale)
    stats = {
        "delta_rms": float(merged_delta.square().mean().sqrt()),
        "delta_max_abs": float(merged_delta.abs().max()),
        **method.report.stats,
    }
    merged = base.add_(merged_delta).to(output_dtype)
    return merged, stats


def _update_from_lora(method: Method, pass_index: int, source_index: int, adapter: LoraAdapter,
                      name: str, delta: torch.Tensor) -> None:
    """A LoRA source in factored form, Δ = left·rightᵀ (the method uses the factors or forms
    the product); a tensor the adapter does not touch has Δ = 0."""
    factors = adapter.factors(name, delta.dtype, delta.device)
    if factors is None:
        delta.zero_()
        method.update(pass_index, source_index, delta)
    else:
        method.update_factored(pass_index, source_index, *factors)


def _read_into(target: torch.Tensor, checkpoint: Checkpoint, name: str,
               minus: torch.Tensor | None = None) -> None:
    """target = tensor (− minus), read from the memory-mapped file a slice of rows at a time, so
    the raw source tensor never exists whole, then checked for NaN/Inf."""
    info = checkpoint.tensors[name]
    chunk = READ_CHUNK_ELEMENTS if target.device.type == "cpu" else GPU_READ_CHUNK_ELEMENTS
    try:
        with safe_open(info.file, framework="pt", device="cpu") as handle:
            if target.dim() == 0:
                target.copy_(handle.get_tensor(name))
            else:
                source = handle.get_slice(name)
                step = max(1, chunk // max(1, target[0].numel()))
                for start in range(0, target.shape[0], step):
                    raw = source[start:start + step]
                    # to the device in the file's dtype (bfloat16: half the bytes), then convert
                    target[start:start + step].copy_(raw.to(target.device))
    except (OSError, RuntimeError, SafetensorError) as error:  # how safetensors reports I/O
        raise SourceError(
            f"source {checkpoint.label}: cannot read tensor {name} ({error}); "
            "the file changed or is truncated, re-download it"
        ) from None
    if minus is not None:
        target.sub_(minus)
    # A NaN or Inf anywhere makes the sum non-finite: one reduction (one device sync) per tensor,
    # ~40x cheaper than isfinite().all(); finite weights cannot overflow a float32 sum.
    if not torch.isfinite(target.sum()):
        raise SourceError(
            f"source {checkpoint.label}: tensor {name} contains NaN or Inf; "
            "this fine-tune diverged or is corrupted, leave it out or re-save it"
        )
