"""raymerge_manifest.json: what went in (hashes, revisions), with which software, and what came
out (per-tensor statistics)."""

from __future__ import annotations

import hashlib
import os
import platform
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from raymerge.errors import SourceError
from raymerge.sources.checkpoint import Checkpoint

_LIBRARIES = ("raymerge", "torch", "safetensors", "ray", "numpy", "huggingface_hub", "pydantic")


def sha256_of(path: str) -> str:
    """sha256 of a file, remembered by (real path, size, mtime): a scheduled re-merge of mostly
    unchanged sources hashes only what changed. A Hugging Face cache blob of a large (LFS) file
    is named by the sha256 the Hub published for it: the content is checked against it."""
    real = Path(path).resolve()
    digest = _memoised_sha256(real)
    published = real.name if real.parent.name == "blobs" and _is_sha256(real.name) else None
    if published is not None and digest != published:
        raise SourceError(
            f"{path}: its sha256 {digest} does not match the {published} the Hub published; "
            f"the download is corrupted: delete {real} and download it again"
        )
    return digest


def _is_sha256(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _memoised_sha256(real: Path) -> str:
    stat = real.stat()
    key = hashlib.sha256(f"{real}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    memo = _hash_cache() / key[:2] / key
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    with open(real, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(digest)
    except OSError:
        pass  # a read-only cache only costs the next run a re-hash
    return digest


def _hash_cache() -> Path:
    root = os.environ.get("RAYMERGE_CACHE") or Path.home() / ".cache" / "raymerge"
    return Path(root) / "sha256"


class SourceHasher:
    """Hashes every input file in background threads while the merge runs (hashlib releases
    the GIL), so the manifest costs no extra wall time on a disk-bound merge."""

    def __init__(self, checkpoints: list[Checkpoint], threads: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sha256")
        # files in a store are identified by the store (no byte read here)
        paths = sorted({file for checkpoint in checkpoints if not checkpoint.remote
                        for file in checkpoint.files})
        self._futures: dict[str, Future] = {path: self._pool.submit(sha256_of, path)
                                            for path in paths}

    def result(self) -> dict[str, str]:
        hashes = {path: future.result() for path, future in self._futures.items()}
        self._pool.shutdown()
        return hashes

    def cancel(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def describe_checkpoint(checkpoint: Checkpoint, hashes: dict[str, str], **extra) -> dict:
    if checkpoint.remote:  # the store's identity of each file: sha256 (Hub LFS), ETag, version
        files = {uri.rsplit("/", 1)[-1]: {facts.identity.partition(":")[0]:
                                          facts.identity.partition(":")[2], "bytes": facts.size}
                 for uri, facts in sorted(checkpoint.facts.items())}
    else:
        files = {Path(path).name: {"sha256": hashes[path], "bytes": Path(path).stat().st_size}
                 for path in checkpoint.files}
    return {
        "source": checkpoint.label,
        "directory": None if checkpoint.remote else str(checkpoint.directory),
        "revision": checkpoint.revision,
        **extra,
        "files": files,
    }


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions
