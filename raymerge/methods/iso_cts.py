"""Iso-CTS (reference code danielm1405/iso-merging): a common subspace from the summed task
matrix plus task-specific directions from each source's residual, with a flat spectrum.

c = int(0.8·r), c = r − round((r − c)/N)·N, s = (r − c)//N. Pass 1 sums the sources; the top-c
SVD triplets of the sum are the common space. Pass 2 takes each source's top-s triplets of
Δ_i − U_c·U_cᵀ·Δ_i. The task blocks then the common block are stacked, U and V stacks are
orthogonalised by their polar factors, and M = mean(all kept σ)·U_o·V_oᵀ."""

from __future__ import annotations

import torch
from torch import Tensor

from ..spectral.svd import (
    exact_svd,
    factored_svd,
    leading_triplets,
    polar,
    truncated_svd,
    without_null_components,
)
from .spectral import SpectralMethod

COMMON_FRACTION = 0.8


def subspace_sizes(full_rank: int, num_sources: int) -> tuple[int, int]:
    """(c, s): common-space size and per-source task-specific size, as the reference code."""
    common = int(full_rank * COMMON_FRACTION)
    common = full_rank - round((full_rank - common) / num_sources) * num_sources
    return common, (full_rank - common) // num_sources


class IsoCts(SpectralMethod):
    name = "iso_cts"
    title = "Iso-CTS (isotropic common and task-specific subspaces)"
    paper = ("No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
             "Subspaces, arXiv 2502.04959; code danielm1405/iso-merging")
    max_passes = 2
    state_tensors = 2
    takes_svds = True

    def begin_matrix(self, base: Tensor) -> None:
        self.common, self.per_source = subspace_sizes(min(base.shape), self.num_sources)
        self.passes = 2 if self.per_source > 0 else 1
        self.task_sum = torch.zeros_like(base)
        self.task_U: list[Tensor] = []
        self.task_S: list[Tensor] = []
        self.task_V: list[Tensor] = []

    def update_matrix(self, pass_index: int, source_index: int, weighted: Tensor) -> None:
        if pass_index == 0:
            self.task_sum.add_(weighted)
            return
        if self.task_sum is not None:  # first source of pass 2: fix the common space
            self._common_space()
        residual = weighted.sub_(self.common_U @ (self.common_U.mT @ weighted))
        # The residual outside the common space is mostly the spectrum's flat tail, where a
        # randomized sketch is near-optimal but not the exact triplets: exact unless the
        # recipe asks for randomized outright.
        mode = "randomized" if self.options.svd == "randomized" else "exact"
        U, S, V = without_null_components(*truncated_svd(
            residual, self.per_source, mode, self.svd_seed(source_index)))
        self.task_U.append(U)
        self.task_S.append(S)
        self.task_V.append(V)

    def update_matrix_factored(self, pass_index: int, source_index: int, left: Tensor,
                               right: Tensor) -> None:
        """A LoRA source: (I − U_c·U_cᵀ)·left·rightᵀ stays factored; its SVD from QR."""
        if pass_index == 0:
            self.task_sum.addmm_(left, right.mT)
            return
        if self.task_sum is not None:
            self._common_space()
        projected = left - self.common_U @ (self.common_U.mT @ left)
        U, S, V = without_null_components(
            *factored_svd(projected, torch.ones_like(left[0]), right))
        keep = min(self.per_source, S.numel())  # a rank-r adapter gives at most r
        U, S, V = leading_triplets(U, S, V, keep)
        self.task_U.append(U)
        self.task_S.append(S)
        self.task_V.append(V)

    def _common_space(self) -> None:
        U, S, V = exact_svd(self.task_sum)
        self.task_sum = None
        self.common_U, self.common_S, self.common_V = (
            U[:, : self.common], S[: self.common], V[:, : self.common])

    def finish_matrix(self) -> Tensor:
        if self.task_sum is not None:
            self._common_space()
        stack_U = torch.cat([*self.task_U, self.common_U], dim=1)
        stack_S = torch.cat([*self.task_S, self.common_S])
        stack_V = torch.cat([*self.task_V, self.common_V], dim=1)
        self.task_U, self.task_S, self.task_V = [], [], []
        left, right = polar(stack_U), polar(stack_V)
        flat = stack_S.mean().expand_as(stack_S)
        self.report.factors = (left, flat, right)
        return (left * flat) @ right.mT
