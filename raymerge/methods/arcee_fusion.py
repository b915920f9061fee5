"""Arcee Fusion (mergekit `arcee_fusion`): keep the source's changes that matter most, judged by
how much they move the row's softmax distribution.

mergekit's definition, with B the base and W the other model, rows along the last dimension (a
1-D tensor is one row): p = softmax(W) + 1e-8, q = softmax(B) + 1e-8 per row;
KL_row = Σ p·log(p/q); importance = |W − B|·KL_row per entry; with Q(x) the entry at index
int(x·(n − 1)) of the n sorted importances, threshold = Q(0.5) + 1.5·(Q(0.75) − Q(0.25));
M = Δ where importance ≥ threshold, else 0. One source, one pass.

mergekit takes the quantiles of a random sample of 1,000,000 entries (drawn anew on every run)
when a tensor has more; raymerge takes them of all entries: the values that sample estimates,
reproducibly."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Method, MethodSettings
from .checks import require_sources

SOFTMAX_EPS = 1e-8  # mergekit's, added to both distributions
QUARTILES = (0.25, 0.5, 0.75)
IQR_FACTOR = 1.5
ROW_CHUNK_ELEMENTS = 1 << 20  # rows at a time for the softmax temporaries


class ArceeFusionSettings(MethodSettings):
    takes_weights = False


def row_divergence(base: Tensor, delta: Tensor) -> Tensor:
    """KL(softmax(B + Δ) + eps ‖ softmax(B) + eps) of each row (last dimension), shape (rows, 1);
    a few rows at a time so that the softmax temporaries stay small."""
    columns = base.shape[-1] if base.dim() else 1
    base_rows, delta_rows = base.reshape(-1, columns), delta.reshape(-1, columns)
    divergence = torch.empty(base_rows.shape[0], 1, dtype=base.dtype, device=base.device)
    step = max(1, ROW_CHUNK_ELEMENTS // columns)
    for start in range(0, base_rows.shape[0], step):
        rows = slice(start, start + step)
        reference = torch.softmax(base_rows[rows], dim=-1).add_(SOFTMAX_EPS)
        changed = torch.softmax(base_rows[rows] + delta_rows[rows], dim=-1).add_(SOFTMAX_EPS)
        ratio = torch.log(changed / reference)
        divergence[rows] = (changed * ratio).sum(dim=-1, keepdim=True)
    return divergence


def quartiles(values: Tensor) -> list[float]:
    """Q(0.25), Q(0.5), Q(0.75) as mergekit indexes them: sorted[int(q·(n − 1))], exactly.
    `values` (flat) is reordered in place."""
    positions = [int(q * (values.numel() - 1)) for q in QUARTILES]  # exact: q·(n−1) in float64
    if values.device.type == "cpu":
        as_numpy = values.numpy()
        as_numpy.partition(positions)  # introselect, in place: no sorted copy
        return [float(as_numpy[position]) for position in positions]
    return [float(torch.kthvalue(values, position + 1).values) for position in positions]


class ArceeFusion(Method):
    name = "arcee_fusion"
    title = "Arcee Fusion (the source's most important changes, by a KL-weighted threshold)"
    paper = "mergekit arcee_fusion (arcee.ai)"
    Settings = ArceeFusionSettings
    state_tensors = 2  # the importances, then the merged delta, and the softmax temporaries

    @classmethod
    def check(cls, settings, shapes: dict[str, tuple[int, ...]], num_sources: int,
              options) -> None:
        require_sources(cls.name, num_sources, (1,),
                        "it fuses that model's important changes into the base")

    def begin(self, name: str, base: Tensor) -> None:
        self.base = base
        self.merged: Tensor | None = None

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        divergence = row_divergence(self.base, delta)
        delta_rows = delta.reshape(divergence.shape[0], -1)
        importance = delta_rows.abs().mul_(divergence)
        # in the tensor's dtype, as mergekit computes it (an entry at the threshold stays kept)
        first, median, third = torch.tensor(quartiles(importance.reshape(-1)), dtype=delta.dtype)
        threshold = median + IQR_FACTOR * (third - first)
        # the same products again (the partition reordered them), then the kept changes
        keep = torch.abs(delta_rows, out=importance).mul_(divergence) >= threshold
        self.merged = torch.mul(delta_rows, keep, out=importance).reshape(delta.shape)

    def finish(self) -> Tensor:
        merged, self.merged, self.base = self.merged, None, None
        return merged
