"""Streaming merge methods, registered in one place. Pure torch: no Ray, no file I/O."""

from __future__ import annotations

from collections.abc import Sequence

from .axis import Axis
from .base import COMMON_STATISTICS, MergeOptions, Method, MethodSettings, Statistic, TensorReport
from .calibrated import SVC_PASSES, SVC_STATE_TENSORS, SVC_STATISTICS, Calibrated
from .dare import Dare
from .iso_c import IsoC
from .iso_cts import IsoCts
from .star import Star
from .task_arithmetic import TaskArithmetic
from .ties import Ties
from .tsv import Tsv
from .wudi import Wudi

METHODS: dict[str, type[Method]] = {method.name: method for method in (
    TaskArithmetic,
    Ties,
    Dare,
    Tsv,
    IsoC,
    IsoCts,
    Axis,
    Wudi,
    Star,
)}


def build_method(settings: MethodSettings, weights: Sequence[float], options: MergeOptions,
                 svc_alpha: float | None = None,
                 source_settings: Sequence[MethodSettings] | None = None) -> Method:
    """The recipe's method for one tensor (settings resolved for it), wrapped in SVC
    calibration when the recipe asks for it."""
    method = METHODS[settings.name](settings, weights, options, source_settings)
    if svc_alpha is None:
        return method
    return Calibrated(method, svc_alpha, options)


def footprint(name: str, calibrated: bool) -> tuple[int, int]:
    """(the most passes over the sources a tensor takes, full-size tensors of state): what the
    plan's read and memory estimates need, from the method's declarations and SVC's."""
    method = METHODS[name]
    extra_passes, extra_state = (SVC_PASSES, SVC_STATE_TENSORS) if calibrated else (0, 0)
    return method.max_passes + extra_passes, method.state_tensors + extra_state


def statistics_of(name: str, calibrated: bool) -> tuple[Statistic, ...]:
    """Every per-tensor statistic a merge with this method reports, common ones first."""
    return COMMON_STATISTICS + METHODS[name].statistics + (SVC_STATISTICS if calibrated else ())


__all__ = ["METHODS", "Calibrated", "MergeOptions", "Method", "MethodSettings", "Statistic",
           "TensorReport", "build_method", "footprint", "statistics_of"]
