"""Merge one work unit: stream the sources' tensors one at a time through a method.

Plain Python, no Ray: the distributed layer wraps `merge_unit` with `ray.remote`, tests call it
directly."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
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
from raymerge.vocabulary import Reindexing, Runs, runs_of

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
    reindexing: Reindexing | None = None  # vocabulary-indexed tensors onto the output vocabulary

    def reindexes(self, name: str) -> bool:
        return self.reindexing is not None and name in self.reindexing.axes

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
            if tensor.copied:
                outputs[tensor.name] = _copy_integer_tensor(job, tensor.name)
                tensor_stats[tensor.name] = {"delta_rms": 0.0, "delta_max_abs": 0.0}
                continue
            # A re-indexed tensor's deltas depend on the output vocabulary (and its synthesized
            # rows on the other sources): never from, nor into, the per-source factor cache.
            tensor_options = replace(options, factor_cache=None) if job.reindexes(tensor.name) \
                else options
            method = job.method_for(tensor, tensor_options)
            try:
                merged, tensor_stats[tensor.name] = _merge_tensor(
                    job, method, tensor, TORCH_DTYPES[tensor.output_dtype])
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


def _merge_tensor(job: MergeJob, method: Method, tensor: TensorTask, output_dtype: torch.dtype):
    name = tensor.name
    compute_dtype = TORCH_DTYPES["F64" if job.compute_dtype == "float64" else "F32"]
    base = torch.empty(tensor.shape, dtype=compute_dtype, device=job.device)
    reindexing = job.reindexing if job.reindexes(name) else None
    if reindexing is None:
        _read_into(base, job.base, name)
    else:
        _read_base_reindexed(base, job, name, reindexing)
    delta = torch.empty_like(base)  # one buffer for every source: no allocation per source
    method.begin(name, base)  # sets the number of passes this tensor needs
    for pass_index in range(method.passes):
        for source_index, source in enumerate(job.sources):
            if isinstance(source, LoraAdapter):
                _update_from_lora(method, pass_index, source_index, source, name, delta,
                                  reindexing)
            elif method.cached_update(pass_index, source_index):
                continue  # this source's factors came from the cache: nothing to read
            elif reindexing is None:
                _read_into(delta, source, name, minus=base)
                method.update(pass_index, source_index, delta)
            else:
                _read_delta_reindexed(delta, source, name, reindexing.axes[name],
                                      reindexing.sources[source_index], base)
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
                      name: str, delta: torch.Tensor, reindexing: Reindexing | None) -> None:
    """A LoRA source in factored form, Δ = left·rightᵀ (the method uses the factors or forms
    the product); a tensor the adapter does not touch has Δ = 0. An adapter has the base's
    vocabulary: on a re-indexed tensor its factor along the vocabulary axis takes the output
    rows of the base's tokens, and is zero on the others."""
    factors = adapter.factors(name, delta.dtype, delta.device)
    if factors is None:
        delta.zero_()
        method.update(pass_index, source_index, delta)
        return
    if reindexing is not None:
        left, right = factors
        if reindexing.axes[name] == 0:
            factors = (_reindex_rows(left, reindexing.rows, reindexing.base_tokens), right)
        else:
            factors = (left, _reindex_rows(right, reindexing.rows, reindexing.base_tokens))
    method.update_factored(pass_index, source_index, *factors)


def _reindex_rows(factor: torch.Tensor, rows: int, runs: Runs) -> torch.Tensor:
    reindexed = factor.new_zeros((rows, factor.shape[1]))
    for out, src, count in runs:
        reindexed[out:out + count] = factor[src:src + count]
    return reindexed


def _copy_integer_tensor(job: MergeJob, name: str) -> np.ndarray:
    """An integer or boolean tensor, copied from the base: every full source must hold the
    same values (compared a slice of rows at a time; these tensors are small)."""
    base_values = _read_numpy(job.base, name)
    for source in job.sources:
        if isinstance(source, LoraAdapter):
            continue  # an adapter touches floating-point matrices only
        for start, values in _numpy_chunks(source, name, base_values.shape):
            expected = base_values[start:start + len(values)] if base_values.ndim else base_values
            if np.array_equal(values, expected):
                continue
            local = tuple(int(i) for i in np.argwhere(values != expected)[0]) if values.ndim \
                else ()
            where = (local[0] + start, *local[1:]) if local else ()
            raise SourceError(
                f"source {source.label}: tensor {name} ({source.tensors[name].dtype}) holds "
                f"{values[local]} at {list(where)} where the base holds {base_values[where]}; "
                "integer and boolean tensors are copied from the base, not merged: use a "
                "fine-tune that keeps the base's values, or leave it out")
    return np.ascontiguousarray(base_values)


def _read_numpy(checkpoint: Checkpoint, name: str) -> np.ndarray:
    info = checkpoint.tensors[name]
    with _reading(checkpoint, name), safe_open(info.file, framework="numpy") as handle:
        return handle.get_tensor(name)


def _numpy_chunks(checkpoint: Checkpoint, name: str, shape: tuple[int, ...]):
    """(first row, rows) of a tensor, a slice of rows at a time, as numpy."""
    info = checkpoint.tensors[name]
    with _reading(checkpoint, name), safe_open(info.file, framework="numpy") as handle:
        if not shape:
            yield 0, handle.get_tensor(name)
            return
        source = handle.get_slice(name)
        step = max(1, READ_CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))
        for start in range(0, shape[0], step):
            yield start, source[start:min(start + step, shape[0])]


@contextmanager
def _reading(checkpoint: Checkpoint, name: str):
    """How safetensors reports I/O errors, as one SourceError line."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        raise SourceError(
            f"source {checkpoint.label}: cannot read tensor {name} ({error}); "
            "the file changed or is truncated, re-download it"
        ) from None


def _read_into(target: torch.Tensor, checkpoint: Checkpoint, name: str,
               minus: torch.Tensor | None = None) -> None:
    """target = tensor (− minus), read from the memory-mapped file a slice of rows at a time, so
    the raw source tensor never exists whole, then checked for NaN/Inf."""
    info = checkpoint.tensors[name]
    with _reading(checkpoint, name), safe_open(info.file, framework="pt", device="cpu") as handle:
        if target.dim() == 0:
            target.copy_(handle.get_tensor(name))
        else:
            source = handle.get_slice(name)
            step = max(1, _chunk(target) // max(1, target[0].numel()))
            for start in range(0, target.shape[0], step):
                raw = source[start:start + step]
                # to the device in the file's dtype (bfloat16: half the bytes), then convert
                target[start:start + step].copy_(raw.to(target.device))
    if minus is not None:
        target.sub_(minus)
    _check_finite(target, checkpoint, name)


def _chunk(target: torch.Tensor) -> int:
    return READ_CHUNK_ELEMENTS if target.device.type == "cpu" else GPU_READ_CHUNK_ELEMENTS


def _check_finite(target: torch.Tensor, checkpoint: Checkpoint, name: str) -> None:
    # A NaN or Inf anywhere makes the sum non-finite: one reduction (one device sync) per tensor,
    # ~40x cheaper than isfinite().all(); finite weights cannot overflow a float32 sum.
    if not torch.isfinite(target.sum()):
        raise SourceError(
            f"source {checkpoint.label}: tensor {name} contains NaN or Inf; "
            "this fine-tune diverged or is corrupted, leave it out or re-save it"
        )


def _read_runs(target: torch.Tensor, checkpoint: Checkpoint, name: str, axis: int,
               runs: Runs) -> None:
    """Copy the checkpoint's rows (along the vocabulary `axis`) into the target's output rows,
    run by run, a slice of rows at a time; the target's other rows are left as they are."""
    info = checkpoint.tensors[name]
    with _reading(checkpoint, name), safe_open(info.file, framework="pt", device="cpu") as handle:
        source = handle.get_slice(name)
        if axis == 0:
            step = max(1, _chunk(target) // max(1, math.prod(info.shape[1:])))
            for out, src, count in runs:
                for offset in range(0, count, step):
                    rows = min(step, count - offset)
                    raw = source[src + offset:src + offset + rows]
                    target[out + offset:out + offset + rows].copy_(raw.to(target.device))
            return
        # the vocabulary on another axis: slices of the first dimension, re-indexed in place
        step = max(1, _chunk(target) // max(1, math.prod(info.shape[1:])))
        for start in range(0, info.shape[0], step):
            raw = source[start:min(start + step, info.shape[0])].to(target.device)
            block = target[start:start + step]
            for out, src, count in runs:
                block.narrow(axis, out, count).copy_(raw.narrow(axis, src, count))


def _read_base_reindexed(base: torch.Tensor, job: MergeJob, name: str,
                         reindexing: Reindexing) -> None:
    """The base in the output vocabulary: its own rows of the tokens it has (and of its
    padding); the mean of the sources' rows for each token it lacks (one pass over those
    rows); the mean of its token rows for padding past its own."""
    axis = reindexing.axes[name]
    _read_runs(base, job.base, name, axis, reindexing.base_tokens + reindexing.base_padding)
    if reindexing.new_tokens:
        holders_of: dict[int, list[tuple[int, int]]] = {}
        for out, holders in reindexing.new_tokens:
            base.narrow(axis, out, 1).zero_()
            for source_index, row in holders:
                holders_of.setdefault(source_index, []).append((out, row))
        for source_index, rows in sorted(holders_of.items()):
            source = job.sources[source_index]
            # this source's rows of those tokens, side by side: one opening of its file
            shape = list(base.shape)
            shape[axis] = len(rows)
            found = base.new_empty(shape)
            _read_runs(found, source, name, axis,
                       runs_of([(k, row) for k, (_, row) in enumerate(rows)]))
            _check_finite(found, source, name)
            for k, (out, _) in enumerate(rows):
                base.narrow(axis, out, 1).add_(found.narrow(axis, k, 1))
        for out, holders in reindexing.new_tokens:
            base.narrow(axis, out, 1).div_(len(holders))
    if reindexing.mean_padding:
        total = sum(base.narrow(axis, out, count).sum(dim=axis, keepdim=True)
                    for out, _, count in reindexing.base_tokens)
        count = sum(count for _, _, count in reindexing.base_tokens)
        for out in reindexing.mean_padding:
            base.narrow(axis, out, 1).copy_(total / count)
    _check_finite(base, job.base, name)


def _check_finite_rows(target: torch.Tensor, checkpoint: Checkpoint, name: str, axis: int,
                       runs: Runs) -> None:
    for out, _, count in runs:
        _check_finite(target.narrow(axis, out, count), checkpoint, name)


def _gaps(runs: Runs, rows: int) -> list[tuple[int, int]]:
    """(start, count) of the rows no run covers."""
    gaps, position = [], 0
    for out, _, count in sorted(runs):
        if out > position:
            gaps.append((position, out - position))
        position = max(position, out + count)
    if position < rows:
        gaps.append((position, rows - position))
    return gaps


def _read_delta_reindexed(delta: torch.Tensor, source: Checkpoint, name: str, axis: int,
                          runs: Runs, base: torch.Tensor) -> None:
    """The source's delta in the output vocabulary: its row of each token it has minus the
    base's; zero on tokens it lacks and on padding (only those rows are cleared: the buffer's
    other rows are all overwritten)."""
    for start, count in _gaps(runs, delta.shape[axis]):
        delta.narrow(axis, start, count).zero_()
    _read_runs(delta, source, name, axis, runs)
    _check_finite_rows(delta, source, name, axis, runs)
    for out, _, count in runs:
        delta.narrow(axis, out, count).sub_(base.narrow(axis, out, count))
