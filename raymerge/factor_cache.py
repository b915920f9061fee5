"""A content-addressed cache of per-source spectral factors, shared by merges (and nodes).

A source's truncated SVD depends only on the base, the source, the tensor, its weight and the
SVD's settings, never on the other sources: a merge that adds one fine-tune to twenty recomputes
only the new one's SVDs. Entries are safetensors files named by the sha256 of that key, written
to a temporary name and renamed, so concurrent writers (several nodes on a shared volume) and
interrupted writes never leave a torn entry."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "raymerge-factor-cache/1"


@dataclass(frozen=True)
class FactorCacheSpec:
    """Where the cache is and who the inputs are: small, travels with the merge job."""

    root: str
    base: str  # identity of the base
    sources: tuple[str, ...]  # identity of each source, in recipe order


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
        path = self._path(key)
        try:
            tensors = load_file(path, device=str(device))
        except (OSError, SafetensorError):  # absent, or unreadable: recompute
            self.misses += 1
            return None
        self.hits += 1
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store an entry; a read-only or full cache volume only costs later merges a recompute."""
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
