"""Model Stock (arXiv 2403.19522; mergekit `model_stock`): average the fine-tunes and move the
average towards the base by a ratio set by the angle between the task vectors.

mergekit's definition, per vector (the whole tensor; with filter_wise each row, a 1-D tensor one
row): cos θ = mean over pairs i < j of Δ_i·Δ_j / max(|Δ_i||Δ_j|, 1e-6), each clamped to
[−1, 1]; t = N·cos θ / (1 + (N − 1)·cos θ), and t = 0 where |1 + (N − 1)·cos θ| < 1e-6;
result t·mean(W_i) + (1 − t)·B, so M = t·(1/N)·Σ Δ_i. Needs the base and at least two sources.

Streamed in one pass: Σ_{i<j} u_i·u_j = Σ_j u_j·S_{j−1} with u_i = Δ_i/|Δ_i| (0 for a zero Δ_i)
and S_j = u_1 + … + u_j, so a running sum S and a running pair sum per vector give the mean
cosine over all N(N−1)/2 pairs without holding any pair. (The same as (|S_N|² − Σ|u_i|²)/2, but
without that difference of two numbers near N, which loses the digits of a small cos θ.)"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Method, MethodSettings
from .checks import require_at_least
from .sphere import inner, vector_dims

SINGULAR = 1e-6  # mergekit's: t = 0 where the denominator is this close to 0


class ModelStockSettings(MethodSettings):
    filter_wise: bool = False  # one ratio t per row instead of one per tensor
    takes_weights = False


class ModelStock(Method):
    name = "model_stock"
    title = "Model Stock"
    paper = "Model Stock: All we need is just a few fine-tuned models, arXiv 2403.19522"
    Settings = ModelStockSettings
    state_tensors = 2  # Σ u_i and Σ Δ_i

    @classmethod
    def check(cls, settings, shapes: dict[str, tuple[int, ...]], num_sources: int,
              options) -> None:
        require_at_least(cls.name, num_sources, 2,
                         "the angle between task vectors needs two fine-tunes of the base")

    def begin(self, name: str, base: Tensor) -> None:
        # filter_wise: each row (a 1-D tensor is one row); else the whole tensor
        self.dims = vector_dims(base, "rows" if self.settings.filter_wise else "whole")
        self.unit_sum = torch.zeros_like(base)  # S_j
        self.delta_sum = torch.zeros_like(base)
        self.pair_sum: Tensor | float = 0.0  # Σ_{i<j} u_i·u_j, per vector

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        self.delta_sum.add_(delta)
        norms = inner(delta, delta, self.dims).sqrt()
        present = norms > 0
        inverse = torch.where(present, 1.0 / torch.where(present, norms, 1.0), 0.0)
        unit = delta.mul_(inverse.to(delta.dtype))
        self.pair_sum = self.pair_sum + inner(unit, self.unit_sum, self.dims)
        self.unit_sum.add_(unit)

    def finish(self) -> Tensor:
        count = self.num_sources
        cosine = self.pair_sum / (count * (count - 1) / 2)
        denominator = 1 + (count - 1) * cosine
        singular = denominator.abs() < SINGULAR
        ratio = torch.where(singular, 0.0, count * cosine / torch.where(singular, 1.0,
                                                                         denominator))
        merged, self.delta_sum, self.unit_sum = self.delta_sum, None, None
        return merged.mul_((ratio / count).to(merged.dtype))
