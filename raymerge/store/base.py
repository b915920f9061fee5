"""What every store is: a directory of named files (a model's weights, config, tokenizer files)
that can be listed with sizes and identities, read whole when small, and read by byte range.

Local directories, object-store prefixes (s3://, gs://, abfs://) and Hub repos are stores; the
rest of raymerge sees only this interface. Files are named relative to the store's root, with
`/` separators; a file's `uri` names it on any node (tasks open weights by it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from raymerge.errors import ClusterLostError, SourceError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack",
                   ".onnx", ".pkl")


@dataclass(frozen=True)
class FileFacts:
    """A file's size and what pins its content: `sha256:…` (a Hub LFS file, or a local file's
    digest), `etag:…` / `version:…` (an object store's), `mtime:…` (a local file not hashed)."""

    size: int
    identity: str


class Store(Protocol):
    label: str  # as the user wrote it
    remote: bool

    def files(self) -> dict[str, FileFacts]: ...

    def read(self, name: str) -> bytes: ...

    def uri(self, name: str) -> str: ...

    def open(self, name: str) -> ByteSource: ...


class ByteSource(Protocol):
    """A file's bytes by position."""

    def read_into(self, view: memoryview, offset: int) -> None: ...

    def close(self) -> None: ...


class StoreUnavailableError(ClusterLostError):
    """The store did not answer (timeouts, 5xx, throttling, resets) after every retry: not the
    input's fault, so a merge keeps its finished units and the same command resumes."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason  # the last error, for a message of the caller's own

    def __reduce__(self):  # crosses from a Ray task to the driver with its reason
        return type(self), (str(self), self.reason)


class Transient(Exception):
    """A store error worth retrying (wraps the original)."""


T = TypeVar("T")


def with_retries(what: Callable[[], T], where: str, attempts: int, first_wait: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """what(), retried with exponential backoff (first_wait, ×2, at most 8 s) while it raises
    Transient; StoreUnavailableError naming `where` after the last attempt."""
    wait = first_wait
    for attempt in range(1, attempts + 1):
        try:
            return what()
        except Transient as error:
            if attempt == attempts:
                raise StoreUnavailableError(
                    f"{where}: the store did not answer after {attempts} attempts ({error}); "
                    "once it is back,", str(error)) from None
            sleep(wait)
            wait = min(8.0, wait * 2)
    raise AssertionError("unreachable")


def not_found(label: str, what: str, fix: str) -> SourceError:
    return SourceError(f"source {label}: {what}; {fix}")
