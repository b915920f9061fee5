"""Any method followed by SVC on each matrix: one more streaming pass over the sources."""

from __future__ import annotations

import torch
from torch import Tensor

from ..spectral.svc import SvcCalibration
from ..spectral.svd import Svd
from .base import MergeOptions, TensorReport

GAMMA_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


class Calibrated:
    """Wraps a method; applies the scale λ itself, since SVC calibrates λ·M."""

    applies_scale = True

    def __init__(self, inner, scale: float, alpha: float, options: MergeOptions) -> None:
        self.inner = inner
        self.scale = scale
        self.alpha = alpha
        self.options = options
        self.state_tensors = inner.state_tensors + 1
        self.report = TensorReport()

    def begin(self, name: str, base: Tensor) -> None:
        self.inner.begin(name, base)
        self.calibrating = self.options.is_spectral_matrix(name, base.shape)
        self.passes = self.inner.passes + (1 if self.calibrating else 0)
        self.calibration: SvcCalibration | None = None
        self.report = TensorReport()

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        if pass_index < self.inner.passes:
            self.inner.update(pass_index, source_index, delta)
            return
        self._start_calibration()
        self.calibration.add(delta)

    def cached_update(self, pass_index: int, source_index: int) -> bool:
        """The inner method's passes may take a source from the factor cache; SVC's may not."""
        inner = getattr(self.inner, "cached_update", None)
        return pass_index < self.inner.passes and inner is not None and inner(pass_index,
                                                                                source_index)

    def _start_calibration(self) -> None:
        if self.calibration is None:
            merged = self.inner.finish().mul_(self.scale)
            self.calibration = SvcCalibration(merged, self.alpha, self._inner_factors())

    def update_factored(self, pass_index: int, source_index: int, left: Tensor,
                        right: Tensor) -> None:
        """A LoRA source in factored form; SVC needs only Uᵀ·Δ_i = (Uᵀ·left)·rightᵀ."""
        if pass_index < self.inner.passes:
            if hasattr(self.inner, "update_factored"):
                self.inner.update_factored(pass_index, source_index, left, right)
            else:
                self.inner.update(pass_index, source_index, left @ right.mT)
            return
        self._start_calibration()
        self.calibration.add_projected((self.calibration.U.mT @ left) @ right.mT)

    def finish(self) -> Tensor:
        if not self.calibrating:
            merged = self.inner.finish().mul_(self.scale)
            self.report = getattr(self.inner, "report", TensorReport())
            return merged
        calibrated, factors = self.calibration.finish()
        gamma = self.calibration.gamma
        quantiles = torch.quantile(gamma.double().cpu(), torch.tensor(GAMMA_QUANTILES,
                                                                      dtype=torch.float64))
        inner_report = getattr(self.inner, "report", TensorReport())
        self.report = TensorReport(
            factors=tuple(factors),
            save_factors=inner_report.save_factors,
            stats={**inner_report.stats,
                   "svc_gamma_quantiles": [round(float(q), 6) for q in quantiles],
                   "spectrum_before": self.calibration.S.float().cpu().tolist(),
                   "spectrum_after": factors.S.float().cpu().tolist()},
        )
        self.calibration = None
        return calibrated

    def _inner_factors(self) -> Svd | None:
        """The basis the method built M in (spectral methods), scaled by λ; None: SVD of λ·M."""
        factors = getattr(self.inner, "report", TensorReport()).factors
        if factors is None:
            return None
        U, S, V = factors
        return Svd(U, S * abs(self.scale), V if self.scale >= 0 else -V)
