"""Iso-C (reference code danielm1405/iso-merging): flatten the spectrum of the summed task
matrix. M = mean(σ)·U·Vᵀ where Σ_i w_i·Δ_i = U·diag(σ)·Vᵀ."""

from __future__ import annotations

import torch
from torch import Tensor

from ..spectral.svd import exact_svd
from .spectral import SpectralMethod


class IsoC(SpectralMethod):
    name = "iso_c"
    title = "Iso-C (isotropic merging in the common subspace)"
    paper = ("No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
             "Subspaces, arXiv 2502.04959; code danielm1405/iso-merging")
    state_tensors = 1
    takes_svds = True

    def begin_matrix(self, base: Tensor) -> None:
        self.task_sum = torch.zeros_like(base)

    def update_matrix(self, pass_index: int, source_index: int, weighted: Tensor) -> None:
        self.task_sum.add_(weighted)

    def update_matrix_factored(self, pass_index: int, source_index: int, left: Tensor,
                               right: Tensor) -> None:
        self.task_sum.addmm_(left, right.mT)

    def finish_matrix(self) -> Tensor:
        U, S, V = exact_svd(self.task_sum)
        del self.task_sum
        flat = S.mean().expand_as(S)
        self.report.factors = (U, flat, V)
        return (U * flat) @ V.mT
