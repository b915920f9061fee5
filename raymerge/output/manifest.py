"""raymerge_manifest.json: what went in (hashes, revisions), with which software, and what came
out (per-tensor statistics)."""

from __future__ import annotations

import hashlib
import platform
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from raymerge.sources.checkpoint import Checkpoint

_LIBRARIES = ("raymerge", "torch", "safetensors", "ray", "numpy", "huggingface_hub", "pydantic")


def sha256_of(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class SourceHasher:
    """Hashes every input file in background threads while the merge runs (hashlib releases
    the GIL), so the manifest costs no extra wall time on a disk-bound merge."""

    def __init__(self, checkpoints: list[Checkpoint], threads: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sha256")
        paths = sorted({file for checkpoint in checkpoints for file in checkpoint.files})
        self._futures: dict[str, Future] = {path: self._pool.submit(sha256_of, path)
                                            for path in paths}

    def result(self) -> dict[str, str]:
        hashes = {path: future.result() for path, future in self._futures.items()}
        self._pool.shutdown()
        return hashes

    def cancel(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def describe_checkpoint(checkpoint: Checkpoint, hashes: dict[str, str], **extra) -> dict:
    return {
        "source": checkpoint.label,
        "directory": str(checkpoint.directory),
        "revision": checkpoint.revision,
        **extra,
        "files": {
            Path(path).name: {"sha256": hashes[path], "bytes": Path(path).stat().st_size}
            for path in checkpoint.files
        },
    }


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions
