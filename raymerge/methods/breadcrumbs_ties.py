"""Model Breadcrumbs with TIES's sign consensus (mergekit `breadcrumbs_ties`): Breadcrumbs'
sparsification of each Δ_i, then sign election and the sum of the agreeing entries."""

from __future__ import annotations

from .base import MethodSettings, Varying
from .breadcrumbs import Breadcrumbs
from .consensus import ConsensusNormalize, ZeroSumSign
from .sparsify import Density, DeterministicRescale, Fraction


class BreadcrumbsTiesSettings(MethodSettings):
    density: Varying[Density] = 1.0  # fraction of entries kept (mergekit's default)
    gamma: Varying[Fraction] = 0.01  # fraction of the largest entries dropped as outliers
    rescale: DeterministicRescale = "none"  # none | l1 (mergekit rescale: true)
    normalize: ConsensusNormalize = "none"  # none | weights (mergekit true) | count (TIES paper)
    zero_sum_sign: ZeroSumSign = "positive"  # positive (mergekit) | none (TIES paper)
    per_source = frozenset({"density", "gamma"})


class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    title = "Model Breadcrumbs with TIES sign consensus"
    Settings = BreadcrumbsTiesSettings
    state_tensors = 5  # sign consensus (4), the magnitude scratch
    sign_consensus = True
