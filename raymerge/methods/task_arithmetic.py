"""Task arithmetic (arXiv 2212.04089): M = Σ w_i Δ_i, kept as one running sum."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from raymerge.recipe import MethodSpec


class TaskArithmetic:
    passes = 1
    state_tensors = 1

    def __init__(self, settings: MethodSpec, weights: Sequence[float]) -> None:
        self.weights = list(weights)
        self.merged: Tensor | None = None

    def begin(self, name: str, base: Tensor) -> None:
        self.merged = None

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        weighted = delta.mul_(self.weights[source_index])
        if self.merged is None:
            self.merged = weighted
        else:
            self.merged.add_(weighted)

    def finish(self) -> Tensor:
        assert self.merged is not None, "finish() before any update()"
        merged, self.merged = self.merged, None
        return merged
