"""Write tensors into preallocated safetensors shards at offsets fixed by the layout."""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from raymerge.errors import OutputError
from raymerge.output.layout import INDEX_NAME, ShardLayout

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class ShardWriter:
    """Creates every shard with its final header and size, then fills tensor bytes in any order.
    With `written` (tensors already on disk, from the progress log) the shards are reopened as
    they are, for a resumed merge. Shards in `elsewhere` (already in the output's store) are not
    created: their tensors count as written and writes to them are dropped (a resumed unit
    rewrites the same bytes)."""

    def __init__(self, directory: str | Path, layout: ShardLayout,
                 written: set[str] | None = None, elsewhere: frozenset[int] = frozenset()
                 ) -> None:
        self.directory = Path(directory)
        self.layout = layout
        self.elsewhere = elsewhere
        self.written: set[str] = set(written or ()) | {
            name for name, slot in layout.slots.items() if slot.shard in elsewhere}
        self._remaining = [0] * len(layout.shards)  # tensors each shard still waits for
        for name, slot in layout.slots.items():
            self._remaining[slot.shard] += name not in self.written
        # whole already (a resumed merge): reported by the first take_completed()
        self._completed = [number for number, left in enumerate(self._remaining)
                           if left == 0 and number not in elsewhere]
        self._fds: list[int | None] = []
        with disk_errors(self.directory, "creating the shards"):
            for number, shard in enumerate(layout.shards):
                self._fds.append(None if number in elsewhere else
                                 self._open(shard, resume=written is not None))

    def _open(self, shard, resume: bool) -> int:
        path = self.directory / shard.file_name
        if resume:
            fd = os.open(path, os.O_RDWR)
            if os.fstat(fd).st_size != shard.size or os.pread(fd, len(shard.header), 0) != \
                    shard.header:
                os.close(fd)
                raise OutputError(f"cannot resume: {path} does not match this merge's layout; "
                                  "delete it and merge again")
            return fd
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(fd, shard.header, 0)
        os.ftruncate(fd, shard.size)
        return fd

    def write(self, tensors: dict[str, np.ndarray], flush: bool = True) -> int:
        """Write finished tensors and (with `flush`) make them durable before returning, so a
        progress log may count them; returns the number of bytes written."""
        written, touched = 0, set()
        with disk_errors(self.directory, "writing"):
            for name, array in tensors.items():
                slot = self.layout.slots[name]
                if slot.shard in self.elsewhere:
                    continue
                data = memoryview(np.ascontiguousarray(array)).cast("B")
                if data.nbytes != slot.nbytes:
                    raise ValueError(f"{name}: got {data.nbytes} bytes, layout expects "
                                     f"{slot.nbytes}")
                fd = self._fds[slot.shard]
                offset = slot.offset
                while data:  # pwrite may write less than asked
                    count = os.pwrite(fd, data, offset)
                    data, offset = data[count:], offset + count
                touched.add(fd)
                written += slot.nbytes
            for fd in touched if flush else ():
                os.fdatasync(fd)
        for name in tensors.keys() - self.written:
            shard = self.layout.slots[name].shard
            self._remaining[shard] -= 1
            if self._remaining[shard] == 0:
                self._completed.append(shard)
        self.written.update(tensors)
        return written

    def take_completed(self) -> list[int]:
        """Shards whose every tensor has been written since the last call."""
        completed, self._completed = self._completed, []
        return completed

    def finish(self, shard: int) -> Path:
        """Flush and close a completed shard; its path (to upload)."""
        with disk_errors(self.directory, "finishing"):
            os.fsync(self._fds[shard])
            os.close(self._fds[shard])
        self._fds[shard] = None
        return self.directory / self.layout.shards[shard].file_name

    def close(self) -> None:
        """Flush every shard to disk and write the index; fails if a tensor was never written."""
        missing = sorted(set(self.layout.slots) - self.written)
        if missing:
            raise RuntimeError(f"{len(missing)} tensors were never written, e.g. {missing[0]}")
        with disk_errors(self.directory, "finishing"):
            for fd in self._fds:
                if fd is not None:
                    os.fsync(fd)
                    os.close(fd)
            self._fds = []
            (self.directory / INDEX_NAME).write_text(self.layout.index_json())

    def abort(self) -> None:
        for fd in self._fds:
            if fd is not None:
                os.close(fd)
        self._fds = []


@contextmanager
def disk_errors(directory: Path, doing: str):
    """OSError from the output disk as one OutputError line (a full disk says so)."""
    try:
        yield
    except OSError as error:
        target = directory.name.removesuffix(".raymerge-staging").lstrip(".")
        if error.errno in _DISK_FULL:
            reason, fix = "the disk is full", "free space or choose an output.path with room"
        else:
            reason, fix = error.strerror or str(error), "check the output disk and permissions"
        raise OutputError(
            f"output {target}: {reason} while {doing} in {directory.parent}; {fix} "
            "(nothing was published; a previous output there is intact)"
        ) from None
