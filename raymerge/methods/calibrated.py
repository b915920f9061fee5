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
        # an expert stack [E, m, n] (after a method that merges it whole): SVC per slice
        self.slices = base.shape[0] if self.options.is_expert_stack(name, base.shape) else None
        self.calibrating = self.slices is not None or self.options.is_spectral_matrix(
            name, base.shape)
        self.passes = self.inner.passes + (SVC_PASSES if self.calibrating else 0)
        self.calibrations: list[SvcCalibration] | None = None
        self.report = TensorReport()

    def _parts(self, tensor: Tensor) -> list[Tensor]:
        return list(tensor) if self.slices is not None else [tensor]

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        if pass_index < self.inner.passes:
            self.inner.update(pass_index, source_index, delta)
            return
        self._start_calibration()
        for calibration, part in zip(self.calibrations, self._parts(delta)):
            calibration.add(part)

    def update_factored(self, pass_index: int, source_index: int, left: Tensor,
                        right: Tensor) -> None:
        """A LoRA source in factored form; SVC needs only Uᵀ·Δ_i = (Uᵀ·left)·rightᵀ."""
        if pass_index < self.inner.passes:
            self.inner.update_factored(pass_index, source_index, left, right)
            return
        self._start_calibration()
        [calibration] = self.calibrations  # adapters hold matrices only
        calibration.add_projected((calibration.U.mT @ left) @ right.mT)

    def streams(self, pass_index: int) -> bool:
        """The inner method's passes stream as it does; SVC's pass needs whole deltas."""
        return pass_index < self.inner.passes and self.inner.streams(pass_index)

    def update_slice(self, pass_index: int, source_index: int, start: int,
                     delta_slice: Tensor) -> None:
        self.inner.update_slice(pass_index, source_index, start, delta_slice)

    def cached_update(self, pass_index: int, source_index: int) -> bool:
        """The inner method's passes may take a source from the factor cache; SVC's may not."""
        return pass_index < self.inner.passes and self.inner.cached_update(pass_index,
                                                                           source_index)

    def _start_calibration(self) -> None:
        if self.calibrations is None:
            merged = self.inner.finish().mul_(self.scale)
            factors = self._inner_factors() if self.slices is None else None
            self.calibrations = [SvcCalibration(part, self.alpha, factors)
                                 for part in self._parts(merged)]

    def finish(self) -> Tensor:
        if not self.calibrating:
            merged = self.inner.finish().mul_(self.scale)
            self.report = self.inner.report
            return merged
        results = [calibration.finish() for calibration in self.calibrations]
        stats = [{**self._statistics(calibration, factors)}
                 for calibration, (_, factors) in zip(self.calibrations, results)]
        if self.slices is None:
            self.report = TensorReport(factors=tuple(results[0][1]),
                                       save_factors=self.inner.report.save_factors,
                                       stats={**self.inner.report.stats, **stats[0]})
            calibrated = results[0][0]
        else:
            self.report = TensorReport(stats=dict(self.inner.report.stats),
                                       parts={f"[{index}]": part
                                              for index, part in enumerate(stats)})
            calibrated = torch.stack([result[0] for result in results])
        self.calibrations = None
        return calibrated

    @staticmethod
    def _statistics(calibration: SvcCalibration, factors: Svd) -> dict:
        gamma = calibration.gamma.double().cpu()
        quantiles = torch.quantile(gamma, torch.tensor(list(GAMMA_QUANTILES.values()),
                                                       dtype=torch.float64))
        return {**{key: round(float(q), 6) for key, q in zip(GAMMA_QUANTILES, quantiles)},
                "spectrum_before": calibration.S.float().cpu().tolist(),
                "spectrum_after": factors.S.float().cpu().tolist()}

    def _inner_factors(self) -> Svd | None:
        """The basis the method built M in (spectral methods), scaled by λ; None: SVD of λ·M."""
        factors = self.inner.report.factors
        if factors is None:
            return None
        U, S, V = factors
        return Svd(U, S * abs(self.scale), V if self.scale >= 0 else -V)
