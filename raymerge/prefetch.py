"""Reading ahead: a background thread fills a small pool of host buffers with the next slices'
bytes while the task converts and merges the current ones.

A buffer goes back to the pool only once nothing reads it any more: on the CPU, when the task
asks for the next slice; on a GPU, when the host-to-device copy out of it has completed (the copy
hands back a wait, a CUDA event's `synchronize`, that the reading thread calls before it refills
the buffer). So a refill never overwrites bytes that a queued copy has yet to read, however busy
the device's stream is, and the task's thread never waits for a copy itself.

Memory: `depth` buffers of `slice_bytes` each per task (4 × 1 MiB on the CPU, 3 × 32 MiB pinned
for a GPU; reading from a store, slices of 32 MiB: 4 × 32 MiB on the CPU), a buffer larger only
for a tensor one of whose rows is larger than a slice."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from raymerge.store.base import ByteSource

# Copies a host slice to the device: (the device tensor, a wait that returns once the host
# bytes may be overwritten). On the CPU there is no copy (the identity, no wait).
Copier = Callable[[torch.Tensor], tuple[torch.Tensor, Callable[[], None] | None]]


def cuda_copier(device: torch.device) -> Copier:
    def copy(host: torch.Tensor):
        on_device = host.to(device, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(device))
        return on_device, copied.synchronize

    return copy


class HostBuffer:
    def __init__(self, nbytes: int, pinned: bool) -> None:
        self.pinned = pinned
        self.bytes = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.pending: Callable[[], None] | None = None  # a copy out of it not yet waited for

    def ready_for(self, nbytes: int) -> memoryview:
        """The first nbytes of the buffer, free to overwrite (after any copy out of it)."""
        if self.pending is not None:
            self.pending()
            self.pending = None
        if self.bytes.numel() < nbytes:  # a row larger than a slice
            self.bytes = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        return memoryview(self.bytes.numpy())[:nbytes]


@dataclass
class ReadRequest:
    """One tensor's bytes, in slices of whole rows: (first element, elements) each."""

    key: tuple[str, str]  # (file, tensor name)
    source: ByteSource
    offset: int  # the tensor's first byte in the file
    itemsize: int
    slices: list[tuple[int, int]]
    ready: queue.Queue = field(default_factory=queue.Queue)  # Filled | error | END
    cancelled: bool = False
    done: bool = False  # the consumer has seen END (or an error)
    inline: bool = False  # read by the consumer's thread as it asks, not ahead


@dataclass
class Filled:
    start: int
    count: int
    buffer: HostBuffer


END = object()


class Prefetcher:
    """A thread that reads requests in order into `depth` buffers, as they come free."""

    def __init__(self, depth: int, slice_bytes: int, pinned: bool) -> None:
        self.free: queue.Queue[HostBuffer] = queue.Queue()
        for _ in range(depth):
            self.free.put(HostBuffer(slice_bytes, pinned))
        self.requests: queue.Queue[ReadRequest | None] = queue.Queue()
        self.queued: deque[ReadRequest] = deque()  # submitted, not yet taken by the consumer
        self.stopping = False
        self.thread: threading.Thread | None = None

    def submit(self, request: ReadRequest) -> None:
        """Read this request ahead: the consumer takes it next (an inline request is not read
        ahead: it is read when taken)."""
        if request.inline:
            return
        self.queued.append(request)
        self._start(request)

    def _start(self, request: ReadRequest) -> ReadRequest:
        if self.thread is None:
            self.stopping = False
            self.thread = threading.Thread(target=self._run, name="raymerge-read", daemon=True)
            self.thread.start()
        self.requests.put(request)
        return request

    def take(self, key: tuple[str, str], make: Callable[[], ReadRequest]) -> ReadRequest:
        """The request for key: the one read ahead if it is next, else a new one (requests read
        ahead for something else are dropped: their buffers come back)."""
        while self.queued:
            request = self.queued.popleft()
            if request.key == key:
                return request
            self.abandon(request)
        request = make()
        return request if request.inline else self._start(request)

    def give_back(self, buffer: HostBuffer, pending: Callable[[], None] | None = None) -> None:
        buffer.pending = pending
        self.free.put(buffer)

    def abandon(self, request: ReadRequest) -> None:
        """Stop reading a request and take back the buffers it filled."""
        request.cancelled = True
        while not request.done:
            item = request.ready.get()
            if isinstance(item, Filled):
                self.give_back(item.buffer)
            else:
                request.done = True

    def stream(self, request: ReadRequest) -> Iterator[Filled]:
        """The request's filled buffers in order; each must be given back by the caller."""
        if request.inline:
            yield from self._read_inline(request)
            return
        try:
            while True:
                item = request.ready.get()
                if item is END:
                    request.done = True
                    return
                if isinstance(item, BaseException):
                    request.done = True
                    raise item
                yield item
        finally:
            if not request.done:
                self.abandon(request)

    def close(self) -> None:
        self.stopping = True
        for request in list(self.queued):
            request.cancelled = True
        self.queued.clear()
        if self.thread is not None:
            self.requests.put(None)
            self.thread.join()
            self.thread = None
        while not self.free.empty():  # wait for copies still reading the buffers
            buffer = self.free.get()
            buffer.ready_for(0)

    def _read_inline(self, request: ReadRequest) -> Iterator[Filled]:
        """Each slice read when asked for, in the consumer's thread: on a CPU whose cores all
        merge, a read thread only competes with them, and the slice is converted while it is
        still in this core's cache."""
        request.done = True
        for start, count in request.slices:
            buffer = self.free.get()
            try:
                request.source.read_into(buffer.ready_for(count * request.itemsize),
                                         request.offset + start * request.itemsize)
            except BaseException:
                self.give_back(buffer)
                raise
            yield Filled(start, count, buffer)

    def _take_free(self) -> HostBuffer | None:
        while not self.stopping:
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _run(self) -> None:
        while True:
            request = self.requests.get()
            if request is None:
                return
            try:
                for start, count in request.slices:
                    if request.cancelled:
                        break
                    buffer = self._take_free()
                    if buffer is None:
                        break
                    nbytes = count * request.itemsize
                    try:
                        view = buffer.ready_for(nbytes)
                        request.source.read_into(view, request.offset + start * request.itemsize)
                    except BaseException:
                        self.give_back(buffer)
                        raise
                    request.ready.put(Filled(start, count, buffer))
            except BaseException as error:  # handed to the consumer, raised in its thread
                request.ready.put(error)
                continue
            request.ready.put(END)
