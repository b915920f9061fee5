"""Streaming merge methods, registered in one place. Pure torch: no Ray, no file I/O."""

from __future__ import annotations

from collections.abc import Sequence

from .ace import Ace
from .arcee_fusion import ArceeFusion
from .axis import Axis
from .base import COMMON_STATISTICS, MergeOptions, Method, MethodSettings, Statistic, TensorReport
from .breadcrumbs import Breadcrumbs
from .breadcrumbs_ties import BreadcrumbsTies
from .calibrated import SVC_PASSES, SVC_STATE_TENSORS, SVC_STATISTICS, Calibrated
from .dare import Dare
from .dare_ties import DareTies
from .della import Della
from .della_linear import DellaLinear
from .iso_c import IsoC
from .iso_cts import IsoCts
from .karcher import Karcher
from .model_stock import ModelStock
from .multislerp import Multislerp
from .nearswap import Nearswap
from .nuslerp import Nuslerp
from .per_slice import PerSlice
from .ram import Ram, RamPlus
from .sce import Sce
from .slerp import Slerp
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
    Slerp,
    Nuslerp,
    Multislerp,
    Karcher,
    ModelStock,
    Nearswap,
    ArceeFusion,
    Ram,
    RamPlus,
    DareTies,
    Breadcrumbs,
    BreadcrumbsTies,
    Della,
    DellaLinear,
    Sce,
    Wudi,
    Star,
    Ace,
)}


def build_method(settings: MethodSettings, weights: Sequence[float], options: MergeOptions,
                 svc_alpha: float | None = None,
                 source_settings: Sequence[MethodSettings] | None = None,
                 tensor: tuple[str, tuple[int, ...]] | None = None) -> Method:
    """The recipe's method for one tensor (settings resolved for it), wrapped in SVC
    calibration when the recipe asks for it. With `tensor` (name, shape), an expert stack is
    merged slice by slice by a method that works on matrices."""
    method_class = METHODS[settings.name]

    def one() -> Method:
        method = method_class(settings, weights, options, source_settings)
        return method if svc_alpha is None else Calibrated(method, svc_alpha, options)

    if tensor is not None and method_class.matrix_wise and options.is_expert_stack(*tensor):
        return PerSlice(one, slices=tensor[1][0])
    return one()


def footprint(name: str, calibrated: bool) -> tuple[int, int]:
    """(the most passes over the sources a tensor takes, full-size tensors of state): what the
    plan's read and memory estimates need, from the method's declarations and SVC's."""
    method = METHODS[name]
    extra_passes, extra_state = (SVC_PASSES, SVC_STATE_TENSORS) if calibrated else (0, 0)
    return method.max_passes + extra_passes, method.state_tensors + extra_state


def takes_svds(name: str, calibrated: bool) -> bool:
    """Whether a merge with this method takes exact SVDs of whole matrices (SVC does)."""
    return calibrated or METHODS[name].takes_svds


def statistics_of(name: str, calibrated: bool) -> tuple[Statistic, ...]:
    """Every per-tensor statistic a merge with this method reports, common ones first."""
    return COMMON_STATISTICS + METHODS[name].statistics + (SVC_STATISTICS if calibrated else ())


__all__ = ["METHODS", "Calibrated", "MergeOptions", "Method", "MethodSettings", "Statistic",
           "TensorReport", "build_method", "footprint", "statistics_of"]
