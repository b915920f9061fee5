"""Reading vocabulary-indexed tensors (embeddings, heads) in the output vocabulary: each
checkpoint's rows of its tokens placed at the output's rows of the same tokens (raymerge/
vocabulary.py decides the runs), the base's missing tokens synthesized from the sources."""

from __future__ import annotations

import math

import torch

from raymerge.reading import CPU_CHUNK_BYTES, GPU_CHUNK_BYTES, check_finite, reading
from raymerge.sources.checkpoint import Checkpoint
from raymerge.sources.tensor_bytes import Rows
from raymerge.vocabulary import Reindexing, Runs, runs_of


def _rows_per_step(target: torch.Tensor) -> int:
    """Elements per read: about a chunk's bytes of float32."""
    return (CPU_CHUNK_BYTES if target.device.type == "cpu" else GPU_CHUNK_BYTES) // 4


def reindex_rows(factor: torch.Tensor, rows: int, runs: Runs) -> torch.Tensor:
    reindexed = factor.new_zeros((rows, factor.shape[1]))
    for out, src, count in runs:
        reindexed[out:out + count] = factor[src:src + count]
    return reindexed


def read_runs(target: torch.Tensor, checkpoint: Checkpoint, name: str, axis: int,
               runs: Runs) -> None:
    """Copy the checkpoint's rows (along the vocabulary `axis`) into the target's output rows,
    run by run, a slice of rows at a time; the target's other rows are left as they are."""
    info = checkpoint.tensors[name]
    with reading(checkpoint, name), Rows(info, checkpoint.storage) as source:
        if axis == 0:
            step = max(1, _rows_per_step(target) // max(1, math.prod(info.shape[1:])))
            for out, src, count in runs:
                for offset in range(0, count, step):
                    rows = min(step, count - offset)
                    raw = source[src + offset:src + offset + rows]
                    target[out + offset:out + offset + rows].copy_(raw.to(target.device))
            return
        # the vocabulary on another axis: slices of the first dimension, re-indexed in place
        step = max(1, _rows_per_step(target) // max(1, math.prod(info.shape[1:])))
        for start in range(0, info.shape[0], step):
            raw = source[start:min(start + step, info.shape[0])].to(target.device)
            block = target[start:start + step]
            for out, src, count in runs:
                block.narrow(axis, out, count).copy_(raw.narrow(axis, src, count))


def read_base_reindexed(base: torch.Tensor, job, name: str,
                         reindexing: Reindexing) -> None:
    """The base in the output vocabulary: its own rows of the tokens it has (and of its
    padding); the mean of the sources' rows for each token it lacks (one pass over those
    rows); the mean of its token rows for padding past its own."""
    axis = reindexing.axes[name]
    read_runs(base, job.base, name, axis, reindexing.base_tokens + reindexing.base_padding)
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
            read_runs(found, source, name, axis,
                       runs_of([(k, row) for k, (_, row) in enumerate(rows)]))
            check_finite(found, source, name)
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
    check_finite(base, job.base, name)


def _check_finite_rows(target: torch.Tensor, checkpoint: Checkpoint, name: str, axis: int,
                       runs: Runs) -> None:
    for out, _, count in runs:
        check_finite(target.narrow(axis, out, count), checkpoint, name)


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


def read_delta_reindexed(delta: torch.Tensor, source: Checkpoint, name: str, axis: int,
                          runs: Runs, base: torch.Tensor) -> None:
    """The source's delta in the output vocabulary: its row of each token it has minus the
    base's; zero on tokens it lacks and on padding (only those rows are cleared: the buffer's
    other rows are all overwritten)."""
    for start, count in _gaps(runs, delta.shape[axis]):
        delta.narrow(axis, start, count).zero_()
    read_runs(delta, source, name, axis, runs)
    _check_finite_rows(delta, source, name, axis, runs)
    for out, _, count in runs:
        delta.narrow(axis, out, count).sub_(base.narrow(axis, out, count))
