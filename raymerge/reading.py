"""Reading tensors out of safetensors files into a task's compute buffers, at memory speed.

A task reads every source's tensor once per pass. `TensorReader` reads a tensor's bytes with
pread, a slice of rows at a time, into one reusable byte buffer (no memory mapping: no page fault
per 4 KiB page), converts the slice to the compute dtype, subtracts the base's slice and checks it
is finite while it is still in the cache, and hands each slice on. The raw source tensor never
exists whole, and the work per element is one read of the file's bytes and one write of the
compute buffer. Results are the same bytes as converting and subtracting the whole tensor at
once (elementwise operations; slices are whole rows)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from raymerge.errors import SourceError
from raymerge.sources.checkpoint import Checkpoint
from raymerge.tensor_bits import TORCH_DTYPES

CPU_CHUNK_BYTES = 1 << 20  # a slice of a source's bytes: stays in the L2 cache with its f32 copy
GPU_CHUNK_BYTES = 1 << 25  # fewer, larger host-to-device copies


@contextmanager
def reading(checkpoint, name: str):
    """A file that cannot be read (truncated, deleted, changed) as one SourceError line."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        raise SourceError(
            f"source {checkpoint.label}: cannot read tensor {name} ({error}); "
            "the file changed or is truncated, re-download it"
        ) from None


def check_finite(values: torch.Tensor, checkpoint, name: str) -> None:
    # A NaN or Inf anywhere makes the sum non-finite: one reduction (one device sync) per
    # tensor; finite weights cannot overflow a float32 sum.
    if not torch.isfinite(values.sum()):
        raise_not_finite(checkpoint, name)


def raise_not_finite(checkpoint, name: str) -> None:
    raise SourceError(
        f"source {checkpoint.label}: tensor {name} contains NaN or Inf; "
        "this fine-tune diverged or is corrupted, leave it out or re-save it"
    )


class TensorReader:
    """One per task: its file descriptors and its byte buffer are reused for every read."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.chunk_bytes = CPU_CHUNK_BYTES if self.device.type == "cpu" else GPU_CHUNK_BYTES
        self.buffer = torch.empty(self.chunk_bytes, dtype=torch.uint8,
                                  pin_memory=self.device.type == "cuda")
        self.files: dict[str, int] = {}

    def close(self) -> None:
        for descriptor in self.files.values():
            os.close(descriptor)
        self.files = {}

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _descriptor(self, path: str) -> int:
        if path not in self.files:
            self.files[path] = os.open(path, os.O_RDONLY)
        return self.files[path]

    def slices(self, checkpoint: Checkpoint, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(first element, the next slice of whole rows in the file's dtype, flat) over the
        tensor; each slice is a view of the reader's buffer, valid until the next one."""
        info = checkpoint.tensors[name]
        dtype = TORCH_DTYPES[info.dtype]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        row = max(1, math.prod(info.shape[1:])) if info.shape else 1
        rows_per_slice = max(1, self.chunk_bytes // (row * itemsize))
        if rows_per_slice * row * itemsize > self.buffer.numel():  # one row above the buffer
            self.buffer = torch.empty(row * itemsize, dtype=torch.uint8,
                                      pin_memory=self.device.type == "cuda")
        total = info.numel
        with reading(checkpoint, name):
            descriptor = self._descriptor(info.file)
            for start in range(0, total, rows_per_slice * row):
                count = min(rows_per_slice * row, total - start)
                nbytes = count * itemsize
                view = memoryview(self.buffer.numpy())[:nbytes]
                offset = info.offset + start * itemsize
                while view:
                    got = os.preadv(descriptor, [view], offset)
                    if got == 0:
                        raise OSError(f"unexpected end of file at byte {offset}")
                    view, offset = view[got:], offset + got
                raw = self.buffer[:nbytes].view(dtype)
                yield start, raw.to(self.device, non_blocking=True) \
                    if self.device.type != "cpu" else raw

    def read_into(self, target: torch.Tensor, checkpoint: Checkpoint, name: str,
                  minus: torch.Tensor | None = None) -> None:
        """target = the tensor (− minus), checked finite."""
        for _ in self._converted(checkpoint, name, minus, target.view(-1)):
            pass

    def stream(self, checkpoint: Checkpoint, name: str, minus: torch.Tensor,
               each: Callable[[int, torch.Tensor], None]) -> None:
        """The tensor − minus, checked finite, handed to each(first element, slice) a slice at
        a time (a scratch slice in minus's dtype, valid during the call): no whole delta."""
        for start, part in self._converted(checkpoint, name, minus, None):
            each(start, part)

    def _converted(self, checkpoint: Checkpoint, name: str, minus: torch.Tensor | None,
                   flat: torch.Tensor | None) -> Iterator[tuple[int, torch.Tensor]]:
        like = flat if flat is not None else minus
        subtrahend = minus.reshape(-1) if minus is not None else None
        scratch = None
        total = torch.zeros((), dtype=like.dtype, device=like.device)
        for start, raw in self.slices(checkpoint, name):
            if flat is not None:
                part = flat[start:start + raw.numel()]
            else:
                if scratch is None or scratch.numel() < raw.numel():
                    scratch = torch.empty(raw.numel(), dtype=like.dtype, device=like.device)
                part = scratch[:raw.numel()]
            if subtrahend is not None:  # convert and subtract in one pass: the same rounding
                torch.sub(raw, subtrahend[start:start + raw.numel()], out=part)
            else:
                part.copy_(raw)
            total.add_(part.sum())
            yield start, part
        if not torch.isfinite(total):
            raise_not_finite(checkpoint, name)


def read_numpy(checkpoint: Checkpoint, name: str) -> np.ndarray:
    info = checkpoint.tensors[name]
    with reading(checkpoint, name), safe_open(info.file, framework="numpy") as handle:
        return handle.get_tensor(info.name)  # a view (raymerge.layout) renames the tensor


def numpy_slices(checkpoint: Checkpoint, name: str, shape: tuple[int, ...]):
    """(first row, rows) of a tensor, a slice of rows at a time, as numpy."""
    info = checkpoint.tensors[name]
    with reading(checkpoint, name), safe_open(info.file, framework="numpy") as handle:
        if not shape:
            yield 0, handle.get_tensor(name)
            return
        source = handle.get_slice(info.name)
        step = max(1, (CPU_CHUNK_BYTES // 4) // max(1, math.prod(shape[1:])))
        for start in range(0, shape[0], step):
            yield start, source[start:min(start + step, shape[0])]
