"""TIES merging (arXiv 2306.01708), streamed in one pass with state bounded in N.

Trim each w_i·Δ_i to its `density` fraction of largest-magnitude entries; elect the sign
s = sign(Σ trimmed); M = mean of the trimmed entries whose sign equals s (0 where none).

Σ trimmed = P + Q, where P sums the positive trimmed entries and Q the negative ones, and the
entries agreeing with s are exactly the positive ones (s > 0) or the negative ones (s < 0). So four
running tensors (P, its count, Q, its count) give the exact TIES result in a single pass over the
sources, instead of a sign pass followed by an agreement pass that reads every source twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from raymerge.recipe import MethodSpec


def magnitude_threshold(values: Tensor, density: float) -> Tensor:
    """The k-th largest |value| with k = max(1, int(density·numel)): entries at or above it are
    kept (mergekit's top-k count)."""
    magnitudes = values.abs().flatten()
    keep_count = max(1, int(density * magnitudes.numel()))
    # kthvalue counts from the smallest: the k-th largest is the (n - k + 1)-th smallest.
    return torch.kthvalue(magnitudes, magnitudes.numel() - keep_count + 1).values


def trim_mask(values: Tensor, density: float) -> Tensor:
    """Boolean mask of the entries TIES keeps for one source."""
    if density >= 1.0:
        return torch.ones_like(values, dtype=torch.bool)
    return values.abs() >= magnitude_threshold(values, density)


class Ties:
    passes = 1
    state_tensors = 4

    def __init__(self, settings: MethodSpec, weights: Sequence[float]) -> None:
        self.density = settings.density
        self.weights = list(weights)

    def begin(self, name: str, base: Tensor) -> None:
        zeros = lambda: torch.zeros_like(base)  # noqa: E731
        self.positive_sum, self.positive_count = zeros(), zeros()
        self.negative_sum, self.negative_count = zeros(), zeros()

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        weighted = delta.mul_(self.weights[source_index])
        kept = trim_mask(weighted, self.density)
        positive = kept & (weighted > 0)
        negative = kept & (weighted < 0)
        del kept
        self.positive_sum.add_(torch.where(positive, weighted, 0.0))
        self.positive_count.add_(positive)
        self.negative_sum.add_(torch.where(negative, weighted, 0.0))
        self.negative_count.add_(negative)

    def finish(self) -> Tensor:
        elected_sign = torch.sign(self.positive_sum + self.negative_sum)
        positive_mean = self.positive_sum.div_(self.positive_count.clamp_(min=1))
        negative_mean = self.negative_sum.div_(self.negative_count.clamp_(min=1))
        merged = torch.where(elected_sign > 0, positive_mean, 0.0)
        merged = torch.where(elected_sign < 0, negative_mean, merged)
        del self.positive_sum, self.positive_count, self.negative_sum, self.negative_count
        return merged
