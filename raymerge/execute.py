"""Merge one work unit: stream the sources' tensors one at a time through a method.

Plain Python, no Ray: the distributed layer wraps `merge_unit` with `ray.remote`, tests call it
directly."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from raymerge.dtypes import TORCH_DTYPES, to_numpy_bits
from raymerge.errors import SourceError
from raymerge.memory import PeakMemory
from raymerge.methods import METHODS
from raymerge.plan import WorkUnit
from raymerge.recipe import MethodSpec
from raymerge.sources.checkpoint import Checkpoint, read_tensor


@dataclass(frozen=True)
class MergeJob:
    """Everything a task needs besides its unit; small (paths and headers), shared by all tasks."""

    base: Checkpoint
    sources: list[Checkpoint]
    weights: list[float]
    method: MethodSpec
    compute_dtype: str = "float32"
    device: str = "cpu"
    num_threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def merge_unit(job: MergeJob, unit: WorkUnit) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Merged tensors of one unit (numpy, exact output bytes) and small statistics about it."""
    if job.num_threads:
        torch.set_num_threads(job.num_threads)
    started = time.perf_counter()
    outputs: dict[str, np.ndarray] = {}
    tensor_stats: dict[str, dict[str, float]] = {}
    with PeakMemory() as memory, torch.inference_mode():
        method = METHODS[job.method.name](job.method, job.weights)
        for tensor in unit.tensors:
            merged, tensor_stats[tensor.name] = _merge_tensor(job, method, tensor.name,
                                                               TORCH_DTYPES[tensor.output_dtype])
            outputs[tensor.name] = to_numpy_bits(merged)
            del merged
    stats = {
        "unit": unit.index,
        "name": unit.name,
        "read_bytes": unit.read_bytes,
        "seconds": time.perf_counter() - started,
        "peak_bytes": memory.peak_bytes,
        "tensors": tensor_stats,
    }
    return stats, outputs


def _merge_tensor(job: MergeJob, method, name: str, output_dtype: torch.dtype):
    compute_dtype = TORCH_DTYPES["F64" if job.compute_dtype == "float64" else "F32"]
    base = _read_checked(job.base, name, compute_dtype, job.device)
    method.begin(name, base)
    for pass_index in range(method.passes):
        for source_index, source in enumerate(job.sources):
            delta = _read_checked(source, name, compute_dtype, job.device)
            delta.sub_(base)
            method.update(pass_index, source_index, delta)
            del delta
    merged_delta = method.finish().mul_(job.method.scale)
    stats = {
        "delta_rms": float(merged_delta.square().mean().sqrt()),
        "delta_max_abs": float(merged_delta.abs().max()),
    }
    merged = base.add_(merged_delta).to(output_dtype)
    return merged, stats


def _read_checked(checkpoint: Checkpoint, name: str, dtype: torch.dtype, device: str):
    try:
        tensor = read_tensor(checkpoint.tensors[name])
    except (OSError, RuntimeError) as error:  # safetensors reports I/O problems as these
        raise SourceError(
            f"source {checkpoint.label}: cannot read tensor {name} ({error}); "
            "the file changed or is truncated, re-download it"
        ) from None
    tensor = tensor.to(device=device, dtype=dtype)
    # A NaN or Inf anywhere makes the sum non-finite; one reduction is ~40x cheaper than
    # isfinite().all() (finite weights cannot overflow a float32 sum).
    if not torch.isfinite(tensor.sum()):
        raise SourceError(
            f"source {checkpoint.label}: tensor {name} contains NaN or Inf; "
            "this fine-tune diverged or is corrupted, leave it out or re-save it"
        )
    return tensor
