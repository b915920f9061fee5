"""A store's checkpoint copied whole onto this node, for what must load a model whole: σ tuning
loads the merged model (and reads the base's weights) in every worker, and tokenizes with its
tokenizer. Merging never does this: its tasks read byte ranges.

Copies are kept under RAYMERGE_CACHE (else ~/.cache/raymerge), named by the location and every
file's identity (size, ETag, version or Hub sha256): a changed object makes a new copy, an
unchanged one is reused by every worker on the node."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from raymerge.errors import RaymergeError
from raymerge.store import FileFacts, StorageSettings, Store, is_remote, open_store

MANIFEST_NAME = "raymerge_manifest.json"
_CHUNK = 64 << 20


def local_copy(location: str, storage: StorageSettings | None = None,
               complete_output: bool = False) -> Path:
    """The directory `location` names, on this node: itself when local, else a copy.
    `complete_output`: refuse a raymerge output without its manifest (still being written, or
    interrupted) in one line."""
    if not is_remote(location):
        return Path(location).expanduser().resolve()
    store = open_store(location, storage)
    files = store.files()
    if complete_output and MANIFEST_NAME not in files:
        raise RaymergeError(f"{location} has no {MANIFEST_NAME}: it is not a complete raymerge "
                            "output (still being written, or interrupted); rerun its merge")
    return copy_files(store, files, "downloads")


def copy_files(store: Store, files: dict[str, FileFacts], kind: str) -> Path:
    """A local folder (under the cache's `kind/`) with these files of the store, fetched once
    per content: it is named by the store and the files' identities, so a changed file is
    fetched again and an unchanged one never. Assembled aside and renamed into place: a reader
    never sees half of one, and two processes copying at once both end with the same folder."""
    key = hashlib.sha256(json.dumps(
        [store.label, sorted((n, f.size, f.identity) for n, f in files.items())]).encode())
    root = cache_root() / kind
    target = root / key.hexdigest()[:24]
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
    try:
        for name, fact in files.items():
            path = scratch / name
            path.parent.mkdir(parents=True, exist_ok=True)
            source = store.open(name)
            try:
                with open(path, "wb") as handle:
                    for offset in range(0, fact.size, _CHUNK):
                        chunk = bytearray(min(_CHUNK, fact.size - offset))
                        source.read_into(memoryview(chunk), offset)
                        handle.write(chunk)
            finally:
                source.close()
        try:
            scratch.rename(target)
        except OSError:  # another process finished the same copy first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def cache_root() -> Path:
    """raymerge's node-local cache: RAYMERGE_CACHE, else ~/.cache/raymerge."""
    return Path(os.environ.get("RAYMERGE_CACHE") or Path.home() / ".cache" / "raymerge")
