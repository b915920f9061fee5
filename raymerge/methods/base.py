"""The streaming method protocol (DESIGN.md): sources arrive one delta at a time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ..recipe import DEFAULT_EXCLUDE, MethodSpec
from ..roles import is_excluded


@dataclass(frozen=True)
class MergeOptions:
    """What a method needs beyond its own settings."""

    exclude: tuple[str, ...] = tuple(DEFAULT_EXCLUDE)  # kept out of every spectral step
    svd: str = "auto"  # auto | exact | randomized
    factor_cache: Any = None  # a FactorCache: per-source spectral factors kept across merges

    def is_spectral_matrix(self, name: str, shape: tuple[int, ...] | torch.Size) -> bool:
        return len(shape) == 2 and not is_excluded(name, list(self.exclude))


class Method(Protocol):
    passes: int  # how many times the sources are streamed; may be set per tensor in begin()
    state_tensors: int  # full-size tensors held between updates, for the memory estimate

    def __init__(self, settings: MethodSpec, weights: Sequence[float],
                 options: MergeOptions) -> None: ...

    def begin(self, name: str, base: Tensor) -> None: ...

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        """Consume one source's delta. The method may modify `delta` in place but must not keep
        it: the engine reuses the buffer for the next source."""

    def finish(self) -> Tensor:
        """The merged delta M for the current tensor (before the scale λ)."""


@dataclass
class TensorReport:
    """What a method may leave after finish(): factors of the merged delta, and statistics."""

    # U, σ, V with M = U·diag(σ)·Vᵀ, U and V orthonormal: the basis the method built M in. SVC
    # calibrates in it (for an isotropic M, as Iso-C's, any other basis would be arbitrary).
    factors: tuple[Tensor, Tensor, Tensor] | None = None
    save_factors: bool = False  # write them to the spectral_factors/ sidecar (AXIS, for tuning)
    stats: dict = field(default_factory=dict)
