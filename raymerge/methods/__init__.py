"""Streaming merge methods, registered in one place. Pure torch: no Ray, no file I/O."""

from __future__ import annotations

from collections.abc import Sequence

from .axis import Axis
from .base import MergeOptions, Method, TensorReport
from .calibrated import Calibrated
from .dare import Dare
from .iso_c import IsoC
from .iso_cts import IsoCts
from .task_arithmetic import TaskArithmetic
from .ties import Ties
from .tsv import Tsv

METHODS: dict[str, type[Method]] = {
    "task_arithmetic": TaskArithmetic,
    "ties": Ties,
    "dare": Dare,
    "tsv": Tsv,
    "iso_c": IsoC,
    "iso_cts": IsoCts,
    "axis": Axis,
}


def build_method(settings, weights: Sequence[float], options: MergeOptions,
                 svc_alpha: float | None = None):
    """The recipe's method, wrapped in SVC calibration when the recipe asks for it."""
    method = METHODS[settings.name](settings, weights, options)
    if svc_alpha is None:
        return method
    return Calibrated(method, settings.scale, svc_alpha, options)


__all__ = ["METHODS", "Calibrated", "MergeOptions", "Method", "TensorReport", "build_method"]
