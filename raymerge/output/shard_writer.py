"""Write tensors into preallocated safetensors shards at offsets fixed by the layout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from raymerge.output.layout import INDEX_NAME, ShardLayout


class ShardWriter:
    """Creates every shard with its final header and size, then fills tensor bytes in any order."""

    def __init__(self, directory: str | Path, layout: ShardLayout) -> None:
        self.directory = Path(directory)
        self.layout = layout
        self.written: set[str] = set()
        self._fds = []
        for shard in layout.shards:
            fd = os.open(self.directory / shard.file_name, os.O_RDWR | os.O_CREAT | os.O_TRUNC,
                         0o644)
            self._fds.append(fd)
            os.pwrite(fd, shard.header, 0)
            os.ftruncate(fd, shard.size)

    def write(self, tensors: dict[str, np.ndarray]) -> int:
        """Write finished tensors; returns the number of bytes written."""
        written = 0
        for name, array in tensors.items():
            slot = self.layout.slots[name]
            data = memoryview(np.ascontiguousarray(array)).cast("B")
            if data.nbytes != slot.nbytes:
                raise ValueError(f"{name}: got {data.nbytes} bytes, layout expects {slot.nbytes}")
            fd = self._fds[slot.shard]
            offset = slot.offset
            while data:  # pwrite may write less than asked
                count = os.pwrite(fd, data, offset)
                data, offset = data[count:], offset + count
            self.written.add(name)
            written += slot.nbytes
        return written

    def close(self) -> None:
        """Flush every shard to disk and write the index; fails if a tensor was never written."""
        missing = sorted(set(self.layout.slots) - self.written)
        if missing:
            raise RuntimeError(f"{len(missing)} tensors were never written, e.g. {missing[0]}")
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        (self.directory / INDEX_NAME).write_text(self.layout.index_json())

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
