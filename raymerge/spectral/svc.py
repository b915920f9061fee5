"""SVC, Singular Value Calibration (arXiv 2602.05536; code lyymuwu/SVC), streamed.

With M = U·diag(σ)·Vᵀ the merged delta (λ applied), for each direction r and source i:
    a_m[r] = u_rᵀ M = σ_r v_rᵀ,   a_i[r] = u_rᵀ Δ_i,
    s_i[r] = ⟨a_m[r], a_i[r]⟩ / max(‖a_i[r]‖², 1e-12),
    γ[r]   = 1 / mean_i max(s_i[r], α),
    M'     = U·diag(γ·σ)·Vᵀ.
Sources arrive one at a time: only Σ_i max(s_i[r], α) is kept (r numbers), and one source's
projection Uᵀ·Δ_i (r × n) at a time."""

from __future__ import annotations

import torch
from torch import Tensor

from .svd import Svd, exact_svd

NORM_FLOOR = 1e-12


class SvcCalibration:
    def __init__(self, merged: Tensor, alpha: float, factors: Svd | None = None) -> None:
        self.U, self.S, self.V = factors if factors is not None else exact_svd(merged)
        self.alpha = alpha
        self.merged_rows = self.S[:, None] * self.V.mT  # a_m: r × n
        self.clipped_sum = torch.zeros_like(self.S)
        self.count = 0

    def add(self, delta: Tensor) -> None:
        """One source's unweighted task delta Δ_i."""
        self.add_projected(self.U.mT @ delta)

    def add_projected(self, source_rows: Tensor) -> None:
        """One source's a_i = Uᵀ·Δ_i (r × n), when the caller can form it more cheaply."""
        agreement = (self.merged_rows * source_rows).sum(dim=1)
        strength = agreement / source_rows.square().sum(dim=1).clamp(min=NORM_FLOOR)
        self.clipped_sum.add_(strength.clamp(min=self.alpha))
        self.count += 1

    def finish(self) -> tuple[Tensor, Svd]:
        """M' and its factors (U, γ·σ, V); also γ itself as `gamma`."""
        self.gamma = self.count / self.clipped_sum
        calibrated_S = self.gamma * self.S
        calibrated = (self.U * calibrated_S) @ self.V.mT
        return calibrated, Svd(self.U, calibrated_S, self.V)
