"""DARE-TIES (mergekit `dare_ties`; DARE, arXiv 2311.03099, with TIES's sign consensus): keep
each entry of Δ_i with probability `density` (the mask `dare` draws with p = 1 − density and the
same seed), rescale the survivors, weight them, elect signs and sum the agreeing entries."""

from __future__ import annotations

from torch import Tensor

from .base import MethodSettings, Varying
from .consensus import ConsensusNormalize, ZeroSumSign
from .generalized import GeneralizedTaskArithmetic
from .sparsify import Density, Rescale, keep_random


class DareTiesSettings(MethodSettings):
    density: Varying[Density] = 1.0  # probability that an entry is kept (mergekit's default)
    seed: int = 0
    rescale: Rescale = "l1"  # l1 (mergekit rescale: true) | inverse: 1/density | none
    normalize: ConsensusNormalize = "none"  # none | weights (mergekit true) | count (TIES paper)
    zero_sum_sign: ZeroSumSign = "positive"  # positive (mergekit) | none (TIES paper)
    per_source = frozenset({"density"})


class DareTies(GeneralizedTaskArithmetic):
    name = "dare_ties"
    title = "DARE-TIES (random drops, then TIES sign consensus)"
    paper = "Language Models are Super Mario (DARE), arXiv 2311.03099; TIES, arXiv 2306.01708"
    Settings = DareTiesSettings
    state_tensors = 6  # sign consensus (4), the current source's draws and mask
    random = True
    sign_consensus = True

    def sparsify(self, source_index: int, delta: Tensor, inverse_rescale: bool) -> float:
        density = self.source_settings[source_index].density
        keep_random(delta, density, self.generator(source_index))
        return 1.0 / density if inverse_rescale and density > 0.0 else 1.0
