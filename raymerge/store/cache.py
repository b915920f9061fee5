"""A unit's node-local cache of what it fetched from a store: methods that pass over the sources
twice (TIES, AXIS+SVC, Iso-CTS, WUDI, ...) read each byte range from the store once and the
second time from local disk (`runtime.source_cache`, e.g. an NVMe directory). The cache belongs
to one unit: its files are removed when the unit's reader closes, and it holds at most `limit`
bytes (past that, ranges are fetched again rather than kept)."""

from __future__ import annotations

import os
import tempfile

from raymerge.store.base import ByteSource


class CachedSource:
    def __init__(self, inner: ByteSource, directory: str, budget: list[int]) -> None:
        self.inner = inner
        os.makedirs(directory, exist_ok=True)
        descriptor, self.path = tempfile.mkstemp(dir=directory, prefix="range-")
        self.descriptor = descriptor
        self.kept: set[tuple[int, int]] = set()
        self.budget = budget  # bytes the unit may still keep, shared by its sources
        self.fetched_bytes = 0

    def read_into(self, view: memoryview, offset: int) -> None:
        span = (offset, len(view))
        if span in self.kept:
            got = os.preadv(self.descriptor, [view], offset)
            if got == len(view):
                return
        self.inner.read_into(view, offset)
        self.fetched_bytes += len(view)
        if self.budget[0] >= len(view):
            os.pwrite(self.descriptor, view, offset)  # sparse: only fetched ranges use disk
            self.kept.add(span)
            self.budget[0] -= len(view)

    def close(self) -> None:
        self.inner.close()
        os.close(self.descriptor)
        os.unlink(self.path)
