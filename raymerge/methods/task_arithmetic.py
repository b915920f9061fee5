"""Task arithmetic (arXiv 2212.04089): M = Σ w_i Δ_i, kept as one running sum."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..recipe import MethodSpec
from .base import MergeOptions


class TaskArithmetic:
    passes = 1
    state_tensors = 1

    def __init__(self, settings: MethodSpec, weights: Sequence[float],
                 options: MergeOptions | None = None) -> None:
        self.weights = list(weights)
        self.merged: Tensor | None = None

    def begin(self, name: str, base: Tensor) -> None:
        self.merged = torch.zeros_like(base)

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        self.merged.add_(delta, alpha=self.weights[source_index])

    def update_factored(self, pass_index: int, source_index: int, left: Tensor,
                        right: Tensor) -> None:
        """Δ = left·rightᵀ (a LoRA source): added without a per-source m×n matrix."""
        self.merged.addmm_(left, right.mT, alpha=self.weights[source_index])

    def finish(self) -> Tensor:
        merged, self.merged = self.merged, None
        return merged
