"""Task arithmetic (arXiv 2212.04089): M = Σ w_i Δ_i, kept as one running sum."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Method, MethodSettings


class TaskArithmeticSettings(MethodSettings):
    pass


class TaskArithmetic(Method):
    name = "task_arithmetic"
    title = "Task arithmetic"
    paper = "Editing Models with Task Arithmetic, arXiv 2212.04089"
    Settings = TaskArithmeticSettings

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
