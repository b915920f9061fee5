"""Task arithmetic (arXiv 2212.04089): M = Σ w_i Δ_i, kept as one running sum; with
`normalize` (mergekit's), M = Σ w_i Δ_i / Σ w_i."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Method, MethodSettings
from .consensus import linear_normalized


class TaskArithmeticSettings(MethodSettings):
    normalize: bool = False  # divide M by Σ w_i (mergekit normalize; 1 where |Σ w_i| < 1e-8)


class TaskArithmetic(Method):
    name = "task_arithmetic"
    title = "Task arithmetic"
    paper = "Editing Models with Task Arithmetic, arXiv 2212.04089"
    Settings = TaskArithmeticSettings

    def begin(self, name: str, base: Tensor) -> None:
        self.merged = torch.zeros_like(base)

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        self.merged.add_(delta, alpha=self.weights[source_index])

    def streams(self, pass_index: int) -> bool:
        return True  # a running sum: each slice of Δ_i is added while it is in the cache

    def update_slice(self, pass_index: int, source_index: int, start: int,
                     delta_slice: Tensor) -> None:
        self.merged.view(-1)[start:start + delta_slice.numel()].add_(
            delta_slice, alpha=self.weights[source_index])

    def update_factored(self, pass_index: int, source_index: int, left: Tensor,
                        right: Tensor) -> None:
        """Δ = left·rightᵀ (a LoRA source): added without a per-source m×n matrix."""
        self.merged.addmm_(left, right.mT, alpha=self.weights[source_index])

    def finish(self) -> Tensor:
        merged, self.merged = self.merged, None
        return linear_normalized(merged, self.weights) if self.settings.normalize else merged
