"""The streaming method protocol (DESIGN.md): sources arrive one delta at a time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torch import Tensor

from raymerge.recipe import MethodSpec


class Method(Protocol):
    passes: int  # how many times the sources are streamed
    state_tensors: int  # full-size tensors held between updates, for the memory estimate

    def __init__(self, settings: MethodSpec, weights: Sequence[float]) -> None: ...

    def begin(self, name: str, base: Tensor) -> None: ...

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        """Consume one source's delta. The method may modify `delta` in place but must not keep
        it: the engine reuses the buffer for the next source."""

    def finish(self) -> Tensor:
        """The merged delta M for the current tensor (before the scale λ)."""
