"""Any method followed by SVC on each matrix: one more streaming pass over the sources."""

from __future__ import annotations

import torch
from torch import Tensor

from ..spectral.svc import SvcCalibration
from ..spectral.svd import Svd
from .base import MergeOptions, Method, Statistic, TensorReport

GAMMA_QUANTILES = {"svc_gamma_min": 0.0, "svc_gamma_q25": 0.25, "svc_gamma_median": 0.5,
                   "svc_gamma_q75": 0.75, "svc_gamma_max": 1.0}
SVC_PAPER = "Singular Value Calibration (SVC), arXiv 2602.05536; code lyymuwu/SVC"
SVC_STATISTICS = (
    Statistic("svc_gamma_min", "float", "γ min", ".3f"),
    Statistic("svc_gamma_q25", "float"),
    Statistic("svc_gamma_median", "float", "γ med", ".3f"),
    Statistic("svc_gamma_q75", "float"),
    Statistic("svc_gamma_max", "float", "γ max", ".3f"),
    Statistic("spectrum_before", "float_list", in_manifest=False),
    Statistic("spectrum_after", "float_list", in_manifest=False),
)
SVC_PASSES = 1  # the pass that projects every source on the merged delta's left singular vectors
SVC_STATE_TENSORS = 1  # the merged delta and its factors, held through that pass


class Calibrated(Method):
    """Wraps a method; applies the scale λ itself, since SVC calibrates λ·M."""

    applies_scale = True

    def __init__(self, inner: Method, alpha: float, options: MergeOptions) -> None:
        super().__init__(inner.settings, inner.weights, options, inner.source_settings)
        self.inner = inner
        self.scale = inner.settings.scale
        self.alpha = alpha

    def begin(self, name: str, base: Tensor) -> None:
        self.inner.begin(name, base)
        self.calibrating = self.options.is_spectral_matrix(name, base.shape)
        self.passes = self.inner.passes + (SVC_PASSES if self.calibrating else 0)
        self.calibration: SvcCalibration | None = None
        self.report = TensorReport()

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        if pass_index < self.inner.passes:
            self.inner.update(pass_index, source_index, delta)
            return
        self._start_calibration()
        self.calibration.add(delta)

    def update_factored(self, pass_index: int, source_index: int, left: Tensor,
                        right: Tensor) -> None:
        """A LoRA source in factored form; SVC needs only Uᵀ·Δ_i = (Uᵀ·left)·rightᵀ."""
        if pass_index < self.inner.passes:
            self.inner.update_factored(pass_index, source_index, left, right)
            return
        self._start_calibration()
        self.calibration.add_projected((self.calibration.U.mT @ left) @ right.mT)

    def cached_update(self, pass_index: int, source_index: int) -> bool:
        """The inner method's passes may take a source from the factor cache; SVC's may not."""
        return pass_index < self.inner.passes and self.inner.cached_update(pass_index,
                                                                           source_index)

    def _start_calibration(self) -> None:
        if self.calibration is None:
            merged = self.inner.finish().mul_(self.scale)
            self.calibration = SvcCalibration(merged, self.alpha, self._inner_factors())

    def finish(self) -> Tensor:
        if not self.calibrating:
            merged = self.inner.finish().mul_(self.scale)
            self.report = self.inner.report
            return merged
        calibrated, factors = self.calibration.finish()
        gamma = self.calibration.gamma.double().cpu()
        quantiles = torch.quantile(gamma, torch.tensor(list(GAMMA_QUANTILES.values()),
                                                       dtype=torch.float64))
        self.report = TensorReport(
            factors=tuple(factors),
            save_factors=self.inner.report.save_factors,
            stats={**self.inner.report.stats,
                   **{key: round(float(q), 6) for key, q in zip(GAMMA_QUANTILES, quantiles)},
                   "spectrum_before": self.calibration.S.float().cpu().tolist(),
                   "spectrum_after": factors.S.float().cpu().tolist()},
        )
        self.calibration = None
        return calibrated

    def _inner_factors(self) -> Svd | None:
        """The basis the method built M in (spectral methods), scaled by λ; None: SVD of λ·M."""
        factors = self.inner.report.factors
        if factors is None:
            return None
        U, S, V = factors
        return Svd(U, S * abs(self.scale), V if self.scale >= 0 else -V)
