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
from contextlib import closing, contextmanager, suppress

import numpy as np
import torch
from safetensors import SafetensorError

from raymerge.errors import SourceError
from raymerge.prefetch import Copier, Prefetcher, ReadRequest, cuda_copier
from raymerge.sources.checkpoint import Checkpoint
from raymerge.sources.tensor_bytes import read_numpy_tensor
from raymerge.store import ByteSource, open_bytes
from raymerge.store.cache import CachedSource
from raymerge.tensor_bits import TORCH_DTYPES

Read = tuple[Checkpoint, str]  # a tensor of a checkpoint, by name

CPU_CHUNK_BYTES = 1 << 20  # a slice of a source's bytes: stays in the L2 cache with its f32 copy
GPU_CHUNK_BYTES = 1 << 25  # fewer, larger host-to-device copies
REMOTE_CHUNK_BYTES = 1 << 25  # from a store: 4 range requests of 8 MiB in flight per slice
# reading every source's slice in turn: the slice in the compute dtype, the base's and the
# method's state stay in a core's L2 cache (about 1 MiB in all) for every source
ACROSS_SLICE_BYTES = 1 << 18


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
    """One per task: its open files, its read-ahead thread and its buffers serve every read.

    Reads come in the order they are asked for; `read_ahead` names the next one so that its
    first slices are read while the current tensor is merged."""

    def __init__(self, device: str = "cpu", copier: Copier | None = None,
                 depth: int | None = None, slice_bytes: int | None = None,
                 source_cache: tuple[str, int] | None = None,
                 read_ahead: bool | None = None) -> None:
        self.device = torch.device(device)
        on_cpu = self.device.type == "cpu"
        # read ahead on a thread of its own: for a GPU, and for stores (latency to hide); on
        # the CPU from local files, where every core merges, reads are inline (measured faster:
        # benchmarks/README.md)
        self.ahead = read_ahead
        self.slice_bytes = slice_bytes or (CPU_CHUNK_BYTES if on_cpu else GPU_CHUNK_BYTES)
        # the copy to the device (none on the CPU); tests inject a copier that completes late
        self.copier = copier if copier is not None else (None if on_cpu
                                                         else cuda_copier(self.device))
        self.prefetcher = Prefetcher(depth or (4 if on_cpu else 3), self.slice_bytes,
                                     pinned=self.device.type == "cuda")
        self.files: dict[str, ByteSource] = {}
        # (a node-local directory, bytes it may hold): what this reader fetches from a store
        # is kept there for a second pass, until the reader closes
        self.source_cache = source_cache
        self.cache_budget = [source_cache[1] if source_cache else 0]
        self.fetched_from_stores = 0  # bytes of files closed so far

    @property
    def fetched_bytes(self) -> int:
        """Bytes this reader fetched from stores (not from local files, nor its cache)."""
        return self.fetched_from_stores + sum(getattr(source, "fetched_bytes", 0)
                                              for source in self.files.values())

    def close(self) -> None:
        self.prefetcher.close()
        self.fetched_from_stores = self.fetched_bytes
        for source in self.files.values():
            source.close()
        self.files = {}
        if self.source_cache:
            with suppress(OSError):
                os.rmdir(self.source_cache[0])

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _source(self, checkpoint: Checkpoint, uri: str) -> ByteSource:
        if uri not in self.files:
            source = open_bytes(uri, checkpoint.storage)
            if self.source_cache and checkpoint.remote:
                source = CachedSource(source, self.source_cache[0], self.cache_budget)
            self.files[uri] = source
        return self.files[uri]

    def _request(self, checkpoint: Checkpoint, name: str) -> ReadRequest:
        info = checkpoint.tensors[name]
        itemsize = TORCH_DTYPES[info.dtype].itemsize
        row = max(1, math.prod(info.shape[1:])) if info.shape else 1
        # a store's slices are larger: fewer requests, each split into parallel ranges
        slice_bytes = max(self.slice_bytes, REMOTE_CHUNK_BYTES) if checkpoint.remote \
            else self.slice_bytes
        step = max(1, slice_bytes // (row * itemsize)) * row
        inline = not (self.ahead if self.ahead is not None else
                      self.copier is not None or checkpoint.remote)
        return ReadRequest(key=(info.file, name), source=self._source(checkpoint, info.file),
                           inline=inline,
                           offset=info.offset, itemsize=itemsize,
                           slices=[(start, min(step, info.numel - start))
                                   for start in range(0, info.numel, step)])

    def read_ahead(self, checkpoint: Checkpoint, name: str) -> None:
        """Start reading this tensor now: it is the next one `slices` will be asked for."""
        with reading(checkpoint, name):
            self.prefetcher.submit(self._request(checkpoint, name))

    def slices(self, checkpoint: Checkpoint, name: str, then: Read | None = None
               ) -> Iterator[tuple[int, torch.Tensor]]:
        """(first element, the next slice of whole rows in the file's dtype, flat, on the
        reader's device) over the tensor; each slice is valid until the next one is asked for.
        `then`: the read that comes next, started as soon as this one is under way."""
        dtype = TORCH_DTYPES[checkpoint.tensors[name].dtype]
        key = (checkpoint.tensors[name].file, name)
        with reading(checkpoint, name):
            request = self.prefetcher.take(key, lambda: self._request(checkpoint, name))
        if then is not None:
            self.read_ahead(*then)
        with reading(checkpoint, name):
            for filled in self.prefetcher.stream(request):
                raw = filled.buffer.bytes[:filled.count * request.itemsize].view(dtype)
                if self.copier is None:
                    try:
                        yield filled.start, raw
                    finally:
                        self.prefetcher.give_back(filled.buffer)
                else:
                    on_device, copied = self.copier(raw)
                    self.prefetcher.give_back(filled.buffer, copied)
                    yield filled.start, on_device

    def read_into(self, target: torch.Tensor, checkpoint: Checkpoint, name: str,
                  minus: torch.Tensor | None = None, then: Read | None = None) -> None:
        """target = the tensor (− minus), checked finite."""
        with closing(self._converted(checkpoint, name, minus, target.view(-1), then)) as parts:
            for _ in parts:
                pass

    def stream(self, checkpoint: Checkpoint, name: str, minus: torch.Tensor,
               each: Callable[[int, torch.Tensor], None], then: Read | None = None) -> None:
        """The tensor − minus, checked finite, handed to each(first element, slice) a slice at
        a time (a scratch slice in minus's dtype, valid during the call): no whole delta."""
        with closing(self._converted(checkpoint, name, minus, None, then)) as parts:
            for start, part in parts:
                each(start, part)

    def streams_across(self, checkpoints: list[Checkpoint]) -> bool:
        """Whether `stream_across` serves these sources: local files read inline on the CPU
        (a read thread and a device copy read one tensor at a time)."""
        return self.copier is None and not self.ahead and \
            not any(checkpoint.remote for checkpoint in checkpoints)

    def stream_across(self, checkpoints: list[Checkpoint], name: str, minus: torch.Tensor,
                      each: Callable[[int, int, torch.Tensor], None]) -> None:
        """Every source's tensor − minus, slice-major: for each slice of rows, each(source
        index, first element, slice) for the sources in order (a scratch slice in minus's
        dtype, valid during the call), each checked finite. For a running sum: its slice and
        the base's stay in the cache across the sources, where reading one source's whole
        tensor after another streams both through memory once per source. Every element still
        meets the sources in the same order: the same bytes as `stream` source by source."""
        infos = [checkpoint.tensors[name] for checkpoint in checkpoints]
        itemsizes = [TORCH_DTYPES[info.dtype].itemsize for info in infos]
        dtypes = [TORCH_DTYPES[info.dtype] for info in infos]
        files = [self._source(checkpoint, info.file)
                 for checkpoint, info in zip(checkpoints, infos, strict=True)]
        subtrahend = minus.reshape(-1)
        row = max(1, math.prod(minus.shape[1:])) if minus.dim() else 1
        step = max(1, ACROSS_SLICE_BYTES // (row * minus.element_size())) * row
        raw_bytes = torch.empty(step * max(itemsizes, default=1), dtype=torch.uint8)
        raw_view = memoryview(raw_bytes.numpy())
        scratch = torch.empty(step, dtype=minus.dtype, device=minus.device)
        totals = [torch.zeros((), dtype=minus.dtype, device=minus.device) for _ in checkpoints]
        for start in range(0, subtrahend.numel(), step):
            count = min(step, subtrahend.numel() - start)
            part, base_part = scratch[:count], subtrahend[start:start + count]
            for index, checkpoint in enumerate(checkpoints):
                nbytes = count * itemsizes[index]
                try:
                    files[index].read_into(raw_view[:nbytes],
                                           infos[index].offset + start * itemsizes[index])
                except OSError as error:
                    with reading(checkpoint, name):
                        raise error
                subtract_into(part, raw_bytes[:nbytes].view(dtypes[index]), base_part)
                totals[index].add_(part.sum())
                each(index, start, part)
        for checkpoint, total in zip(checkpoints, totals, strict=True):
            if not torch.isfinite(total):
                raise_not_finite(checkpoint, name)

    def _converted(self, checkpoint: Checkpoint, name: str, minus: torch.Tensor | None,
                   flat: torch.Tensor | None, then: Read | None
                   ) -> Iterator[tuple[int, torch.Tensor]]:
        like = flat if flat is not None else minus
        subtrahend = minus.reshape(-1) if minus is not None else None
        scratch = None
        total = torch.zeros((), dtype=like.dtype, device=like.device)
        with closing(self.slices(checkpoint, name, then)) as slices:
            for start, raw in slices:
                if flat is not None:
                    part = flat[start:start + raw.numel()]
                else:
                    if scratch is None or scratch.numel() < raw.numel():
                        scratch = torch.empty(raw.numel(), dtype=like.dtype, device=like.device)
                    part = scratch[:raw.numel()]
                if subtrahend is None:
                    part.copy_(raw)
                else:
                    subtract_into(part, raw, subtrahend[start:start + raw.numel()])
                total.add_(part.sum())
                yield start, part
            if not torch.isfinite(total):
                raise_not_finite(checkpoint, name)


def subtract_into(part: torch.Tensor, raw: torch.Tensor, subtrahend: torch.Tensor) -> None:
    """part = raw − subtrahend, in part's (the compute) dtype."""
    if raw.element_size() <= part.element_size():
        # an exact conversion, then the subtraction in the compute dtype: the bytes of a
        # mixed-dtype torch.sub, which on the CPU casts through a temporary and measured 2.6x
        # slower (benchmarks/README.md)
        part.copy_(raw)
        part.sub_(subtrahend)
    else:  # float64 bytes, float32 compute: subtract before rounding
        torch.sub(raw, subtrahend, out=part)


def read_numpy(checkpoint: Checkpoint, name: str) -> np.ndarray:
    with reading(checkpoint, name):
        return read_numpy_tensor(checkpoint.tensors[name], checkpoint.storage)
