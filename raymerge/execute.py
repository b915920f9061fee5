"""Merge one work unit: stream the sources' tensors one at a time through a method.

Plain Python, no Ray: the distributed layer wraps `merge_unit` with `ray.remote`, tests call it
directly."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import torch

from raymerge.errors import ClusterLostError, SourceError
from raymerge.factor_cache import FactorCache, FactorCacheSpec
from raymerge.memory import PeakMemory
from raymerge.methods import MergeOptions, Method, build_method
from raymerge.plan import TensorTask, WorkUnit, check_fits
from raymerge.reading import Read, TensorReader, read_numpy, reading
from raymerge.settings import MethodSettings, evaluate, settings_for_tensor
from raymerge.sources.checkpoint import Checkpoint
from raymerge.sources.lora import LoraAdapter
from raymerge.sources.tensor_bytes import read_bytes
from raymerge.tensor_bits import TORCH_DTYPES, to_numpy_bits
from raymerge.vocabulary import Reindexing
from raymerge.vocabulary_reading import (
    read_base_reindexed,
    read_delta_reindexed,
    reindex_rows,
)

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
    copy: bool = False  # a slice of one checkpoint (mergekit's passthrough): its tensors copied
    copy_scale: Any = None  # ... times this, resolved per tensor (None: the bytes as they are)
    # a node-local directory and the bytes it may hold: store ranges kept for a second pass
    source_cache: tuple[str, int] | None = None

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
    merged delta (numpy, compute dtype).

    A unit that runs out of GPU memory is merged again on its node's CPU (the task has its CPUs
    and host memory; a whole GPU may not be free, and would not help a task that already had
    one). Its tensors then equal the GPU's within float32 rounding, and its stats say so. A
    unit that runs out of memory there too stops the merge as a fault, not bad input: its
    finished units are kept for a rerun with more memory per task."""
    try:
        return _merge_unit_on(job, unit)
    except torch.cuda.OutOfMemoryError as error:
        if job.device == "cpu":
            raise UnitOutOfMemoryError(out_of_memory(unit, str(error))) from None
        tensor = str(error).partition(" @ ")[2]
    try:
        stats, payload = _merge_unit_on(replace(job, device="cpu"), unit)
    except (torch.cuda.OutOfMemoryError, MemoryError) as error:
        raise UnitOutOfMemoryError(out_of_memory(unit, str(error))) from None
    stats["retried_on_cpu"] = f"the GPU ran out of memory on {tensor or 'a tensor'}"
    return stats, payload


def _merge_unit_on(job: MergeJob, unit: WorkUnit) -> tuple[dict[str, Any], dict[str, Any]]:
    check_fits(unit, job.memory)  # before allocating anything
    if job.num_threads:
        torch.set_num_threads(job.num_threads)
    started = time.perf_counter()
    outputs: dict[str, np.ndarray] = {}
    factors: dict[str, dict[str, np.ndarray]] = {}
    tensor_stats: dict[str, dict[str, Any]] = {}
    range_cache = (os.path.join(job.source_cache[0], f"unit-{unit.index}-{os.getpid()}"),
                   job.source_cache[1]) if job.source_cache else None
    on_gpu = torch.device(job.device).type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(job.device)
    with PeakMemory() as memory, torch.inference_mode(), \
            TensorReader(job.device, source_cache=range_cache) as reader:
        cache = FactorCache(job.factor_cache) if job.factor_cache else None
        options = replace(job.options, factor_cache=cache)
        for position, tensor in enumerate(unit.tensors):
            if tensor.copied:
                outputs[tensor.name] = _copy_integer_tensor(job, tensor.name)
                tensor_stats[tensor.name] = {"delta_rms": 0.0, "delta_max_abs": 0.0}
                continue
            if job.copy:  # the checkpoint's own tensor, in the output dtype
                outputs[tensor.name] = to_numpy_bits(_copied(job, tensor))
                tensor_stats[tensor.name] = {"delta_rms": 0.0, "delta_max_abs": 0.0}
                continue
            # A re-indexed tensor's deltas depend on the output vocabulary (and its synthesized
            # rows on the other sources): never from, nor into, the per-source factor cache.
            tensor_options = replace(options, factor_cache=None) if job.reindexes(tensor.name) \
                else options
            method = job.method_for(tensor, tensor_options)
            inject_out_of_memory(job, unit)
            try:
                merged, tensor_stats[tensor.name] = _merge_tensor(
                    job, method, tensor, TORCH_DTYPES[tensor.output_dtype], reader,
                    after=_base_read(job, unit.tensors[position + 1:]))
            except torch.cuda.OutOfMemoryError as error:  # named for the retry's stats
                raise torch.cuda.OutOfMemoryError(f"{error} @ {tensor.name}") from None
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
        "peak_device_bytes": torch.cuda.max_memory_allocated(job.device) if on_gpu else 0,
        "peak_bytes_estimated": unit.peak_bytes,
        "peak_device_bytes_estimated": unit.device_peak_bytes if on_gpu else 0,
        "tensors": tensor_stats,
        "factor_cache_hits": cache.hits if cache else 0,
        "factor_cache_misses": cache.misses if cache else 0,
        "fetched_bytes": reader.fetched_bytes,
    }
    return stats, {"unit": unit.index, "tensors": outputs, "factors": factors}


class UnitOutOfMemoryError(ClusterLostError):
    """A unit did not fit in its task's memory, on the GPU nor on the CPU: the merge stops with
    its finished units kept (exit 3), to be resumed with more memory per task."""


def out_of_memory(unit: WorkUnit, detail: str) -> str:
    from raymerge.sizes import format_size

    where = detail.partition(" @ ")[2]
    return (f"unit {unit.name}: out of memory{' on tensor ' + where if where else ''}, on the "
            f"GPU and again on the CPU (about {format_size(unit.peak_bytes)} per task "
            "estimated); give each task more memory (runtime.memory) or fewer tasks per node "
            "(runtime.max_in_flight), then")


# Fault injection for tests: RAYMERGE_INJECT_OOM="UNIT[:DEVICE]" makes that unit's first tensor
# raise an out-of-memory on that device (cuda: the default), in whatever process merges it.
_INJECT_OOM = "RAYMERGE_INJECT_OOM"


def inject_out_of_memory(job: MergeJob, unit: WorkUnit) -> None:
    target = os.environ.get(_INJECT_OOM)
    if not target:
        return
    name, _, device = target.partition(":")
    if name == unit.name and torch.device(job.device).type == (device or "cuda"):
        raise torch.cuda.OutOfMemoryError(f"injected ({_INJECT_OOM})")


def _base_read(job: MergeJob, following: list[TensorTask]) -> Read | None:
    """The base's tensor that the reader reads next after this tensor's sources, if any."""
    if not following or following[0].copied or job.reindexes(following[0].name):
        return None
    return job.base, following[0].name


def _source_read(job: MergeJob, name: str, source_index: int) -> Read | None:
    """Source source_index's tensor when the reader reads it (an adapter is not read so)."""
    if source_index >= len(job.sources) or isinstance(job.sources[source_index], LoraAdapter):
        return None
    return job.sources[source_index], name


def _streams_across(job: MergeJob, method: Method, pass_index: int,
                    reader: TensorReader) -> bool:
    """Whether this streaming pass reads every source's slice in turn (slice-major): each
    source a checkpoint read whole by the reader, none from the factor cache."""
    return all(not isinstance(source, LoraAdapter) and
               not method.cached_update(pass_index, index)
               for index, source in enumerate(job.sources)) and \
        reader.streams_across(job.sources)


def _merge_tensor(job: MergeJob, method: Method, tensor: TensorTask, output_dtype: torch.dtype,
                  reader: TensorReader, after: Read | None = None):
    """The merged tensor and its statistics. Each read through the reader names the one after
    it (`then`: the next source, the next pass's first, then `after`) so that the reader reads
    ahead while this one is merged."""
    name = tensor.name
    compute_dtype = TORCH_DTYPES["F64" if job.compute_dtype == "float64" else "F32"]
    base = torch.empty(tensor.shape, dtype=compute_dtype, device=job.device)
    reindexing = job.reindexing if job.reindexes(name) else None
    if reindexing is None:
        reader.read_into(base, job.base, name, then=_source_read(job, name, 0))
    else:  # every read of a re-indexed tensor goes through vocabulary_reading, not the reader
        read_base_reindexed(base, job, name, reindexing)
    delta: torch.Tensor | None = None  # one buffer for every source, made when first needed
    method.begin(name, base)  # sets the number of passes this tensor needs
    for pass_index in range(method.passes):
        if reindexing is None and method.streams(pass_index) and _streams_across(
                job, method, pass_index, reader):
            reader.stream_across(job.sources, name, base,
                                 partial(method.update_slice, pass_index))
            continue
        for source_index, source in enumerate(job.sources):
            then = _source_read(job, name, source_index + 1)
            if then is None and source_index + 1 == len(job.sources):
                then = _source_read(job, name, 0) if pass_index + 1 < method.passes else after
            if not isinstance(source, LoraAdapter) and method.cached_update(pass_index,
                                                                            source_index):
                continue  # this source's factors came from the cache: nothing to read
            if reindexing is None and not isinstance(source, LoraAdapter) and \
                    method.streams(pass_index):
                reader.stream(source, name, base, partial(method.update_slice, pass_index,
                                                          source_index), then=then)
                continue
            delta = torch.empty_like(base) if delta is None else delta
            if isinstance(source, LoraAdapter):
                _update_from_lora(method, pass_index, source_index, source, name, delta,
                                  reindexing)
            elif reindexing is None:
                reader.read_into(delta, source, name, minus=base, then=then)
                method.update(pass_index, source_index, delta)
            else:
                read_delta_reindexed(delta, source, name, reindexing.axes[name],
                                      reindexing.sources[source_index], base)
                method.update(pass_index, source_index, delta)
    del delta
    merged_delta = method.finish()
    if not method.applies_scale and method.settings.scale != 1.0:  # × 1: the same bytes
        merged_delta.mul_(method.settings.scale)
    low, high = torch.aminmax(merged_delta) if merged_delta.numel() else (base.new_zeros(()),) * 2
    stats = {
        "delta_rms": float(torch.linalg.vector_norm(merged_delta)) / max(
            1, merged_delta.numel()) ** 0.5,
        "delta_max_abs": max(abs(float(low)), abs(float(high))),
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
            factors = (reindex_rows(left, reindexing.rows, reindexing.base_tokens), right)
        else:
            factors = (left, reindex_rows(right, reindexing.rows, reindexing.base_tokens))
    method.update_factored(pass_index, source_index, *factors)


def _copied(job: MergeJob, tensor: TensorTask) -> torch.Tensor:
    """A copied slice's tensor in the output dtype, times its scale where one is given (in the
    compute dtype, then rounded once)."""
    info = job.base.tensors[tensor.name]
    with reading(job.base, tensor.name):  # by byte range: a local file or a store's object
        raw = read_bytes(info, job.base.storage)
    copied = torch.frombuffer(raw, dtype=torch.uint8).view(TORCH_DTYPES[info.dtype]).reshape(
        info.shape)
    scale = None if job.copy_scale is None else evaluate(job.copy_scale, tensor.name,
                                                         tensor.layer_position)
    if scale is not None and scale != 1:
        compute = TORCH_DTYPES["F64" if job.compute_dtype == "float64" else "F32"]
        copied = copied.to(compute) * scale
    return copied.to(TORCH_DTYPES[tensor.output_dtype])


def _copy_integer_tensor(job: MergeJob, name: str) -> np.ndarray:
    """An integer or boolean tensor, copied from the base: every full source must hold the
    same values (compared a slice of rows at a time; these tensors are small)."""
    base_values = read_numpy(job.base, name)
    for source in job.sources:
        if isinstance(source, LoraAdapter):
            continue  # an adapter touches floating-point matrices only
        values = read_numpy(source, name)
        if not np.array_equal(values, base_values):
            where = tuple(int(i) for i in np.argwhere(values != base_values)[0]) \
                if values.ndim else ()
            raise SourceError(
                f"source {source.label}: tensor {name} ({source.tensors[name].dtype}) holds "
                f"{values[where]} at {list(where)} where the base holds {base_values[where]}; "
                "integer and boolean tensors are copied from the base, not merged: use a "
                "fine-tune that keeps the base's values, or leave it out")
    return np.ascontiguousarray(base_values)


