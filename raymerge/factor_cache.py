"""A content-addressed cache of per-source spectral factors, shared by merges (and nodes).

A source's truncated SVD depends only on the base, the source, the tensor, its weight and the
SVD's settings, never on the other sources: a merge that adds one fine-tune to twenty recomputes
only the new one's SVDs. Entries are safetensors files named by the sha256 of that key, written
to a temporary name and renamed, so concurrent writers (several nodes on a shared volume) and
interrupted writes never leave a torn entry. The root may be an object-store prefix (s3://,
gs://): an entry is then one object, written by one PUT (atomic: never torn either), and every
node reaches it without a shared volume."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save, save_file

from raymerge.store.objects import filesystem_for, scheme_of
from raymerge.store.settings import StorageSettings

FORMAT = "raymerge-factor-cache/1"


@dataclass(frozen=True)
class FactorCacheSpec:
    """Where the cache is and who the inputs are: small, travels with the merge job."""

    root: str
    base: str  # identity of the base
    sources: tuple[str, ...]  # identity of each source, in recipe order
    storage: StorageSettings | None = None  # a root in an object store: its endpoint, region


class FactorCache:
    """One task's view of the cache; counts its hits and misses."""

    def __init__(self, spec: FactorCacheSpec) -> None:
        self.spec = spec
        self.root = Path(spec.root)
        self.hits = 0
        self.misses = 0

    def key(self, source_index: int, tensor: str, settings: dict) -> str:
        identity = {"format": FORMAT, "base": self.spec.base,
                    "source": self.spec.sources[source_index], "tensor": tensor, **settings}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def get(self, key: str, device: torch.device) -> dict[str, torch.Tensor] | None:
        try:
            if scheme_of(self.spec.root):
                tensors = {name: tensor.to(device) for name, tensor in load(
                    self._object(key, lambda filesystem, path: _read(filesystem, path))).items()}
            else:
                tensors = load_file(self._path(key), device=str(device))
        except (OSError, SafetensorError):  # absent, or unreadable: recompute
            self.misses += 1
            return None
        self.hits += 1
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store an entry; a read-only or full cache volume (or a store refusing the write) only
        costs later merges a recompute."""
        if scheme_of(self.spec.root):
            data = save({name: tensor.contiguous().cpu() for name, tensor in tensors.items()},
                        metadata={"format": FORMAT})
            try:
                self._object(key, lambda filesystem, path: _write(filesystem, path, data))
            except OSError:
                pass
            return
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        except OSError:
            return
        os.close(handle)
        try:
            save_file({name: tensor.contiguous().cpu() for name, tensor in tensors.items()},
                      temporary, metadata={"format": FORMAT})
            os.replace(temporary, path)
        except OSError:
            Path(temporary).unlink(missing_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def _object(self, key: str, what):
        filesystem, path = filesystem_for(
            f"{self.spec.root.rstrip('/')}/{key[:2]}/{key}.safetensors",
            self.spec.storage or StorageSettings())
        return what(filesystem, path)


def _read(filesystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def _write(filesystem, path: str, data: bytes) -> None:
    with filesystem.open_output_stream(path) as stream:
        stream.write(data)
