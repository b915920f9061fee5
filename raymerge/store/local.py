"""A local directory as a store: files by pread, identities from size and modification time
(a content digest is the manifest's job, memoised: raymerge.output.manifest.sha256_of)."""

from __future__ import annotations

import os
from pathlib import Path

from raymerge.store.base import FileFacts


class LocalFile:
    """pread into the buffer: no memory mapping, no page fault per 4 KiB page."""

    def __init__(self, path: str) -> None:
        self.descriptor = os.open(path, os.O_RDONLY)

    def read_into(self, view: memoryview, offset: int) -> None:
        while view:
            got = os.preadv(self.descriptor, [view], offset)
            if got == 0:
                raise OSError(f"unexpected end of file at byte {offset}")
            view, offset = view[got:], offset + got

    def close(self) -> None:
        os.close(self.descriptor)


class LocalStore:
    remote = False

    def __init__(self, label: str, directory: Path) -> None:
        self.label = label
        self.directory = Path(directory).resolve()
        self.revision: str | None = None  # a Hub snapshot's commit, for a cached Hub repo

    def files(self) -> dict[str, FileFacts]:
        found = {}
        for path in sorted(self.directory.rglob("*")):
            if path.is_file():
                stat = path.stat()
                found[path.relative_to(self.directory).as_posix()] = FileFacts(
                    stat.st_size, f"mtime:{stat.st_mtime_ns}")
        return found

    def read(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def uri(self, name: str) -> str:
        return str(self.directory / name)

    def open(self, name: str) -> LocalFile:
        return LocalFile(self.uri(name))
