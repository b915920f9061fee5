"""Model Breadcrumbs (arXiv 2312.06795; mergekit `breadcrumbs`): from each Δ_i drop the `gamma`
fraction of entries largest in magnitude (outliers) and keep the next `density` fraction
(sparsify.keep_between_outliers), weight, and sum."""

from __future__ import annotations

from torch import Tensor

from .base import MethodSettings, Varying
from .generalized import GeneralizedTaskArithmetic
from .sparsify import Density, DeterministicRescale, Fraction, keep_between_outliers


class BreadcrumbsSettings(MethodSettings):
    density: Varying[Density] = 1.0  # fraction of entries kept (mergekit's default)
    gamma: Varying[Fraction] = 0.01  # fraction of the largest entries dropped as outliers
    rescale: DeterministicRescale = "none"  # none | l1 (mergekit rescale: true)
    normalize: bool = False  # divide M by Σ w_i (mergekit normalize)
    per_source = frozenset({"density", "gamma"})


class Breadcrumbs(GeneralizedTaskArithmetic):
    name = "breadcrumbs"
    title = "Model Breadcrumbs"
    paper = ("Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, "
             "arXiv 2312.06795")
    Settings = BreadcrumbsSettings
    state_tensors = 2  # running sum, the magnitude scratch

    def needs_scratch(self) -> bool:
        return any(source.density < 1.0 for source in self.source_settings)

    def sparsify(self, source_index: int, delta: Tensor, inverse_rescale: bool) -> float:
        source = self.source_settings[source_index]
        keep_between_outliers(delta, source.density, source.gamma, self.scratch)
        return 1.0
