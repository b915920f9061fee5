"""TIES merging (arXiv 2306.01708), streamed in one pass with state bounded in N.

Trim each Δ_i to its `density` fraction of largest-magnitude entries and weight it,
c_i = w_i·trim(Δ_i); elect the sign s = sign(Σ c_i); M = mean of the c_i whose sign equals s
(0 where none).

The one-pass sign consensus is consensus.py's: four running tensors give the exact TIES result
without a sign pass followed by an agreement pass that reads every source twice. mergekit's `ties`
is the same trim and election with `normalize: weights` (divide by the agreeing weights instead of
counting them), `zero_sum_sign: positive` and, optionally, `rescale: l1`.
"""

from __future__ import annotations

from torch import Tensor

from .base import MethodSettings, Varying
from .consensus import ConsensusNormalize, ZeroSumSign
from .generalized import GeneralizedTaskArithmetic
from .sparsify import (
    CHUNK,
    Density,
    DeterministicRescale,
    chunks,
    keep_largest,
    magnitude_threshold,
)

__all__ = ["CHUNK", "Density", "Ties", "TiesSettings", "chunks", "magnitude_threshold"]


class TiesSettings(MethodSettings):
    density: Varying[Density] = 0.2  # fraction of each source's entries kept
    normalize: ConsensusNormalize = "count"  # count (TIES paper) | weights | none (mergekit)
    rescale: DeterministicRescale = "none"  # none | l1 (mergekit rescale: true)
    zero_sum_sign: ZeroSumSign = "none"  # none (TIES paper) | positive (mergekit)
    per_source = frozenset({"density"})


class Ties(GeneralizedTaskArithmetic):
    name = "ties"
    title = "TIES-Merging"
    paper = "TIES-Merging: Resolving Interference When Merging Models, arXiv 2306.01708"
    Settings = TiesSettings
    # two float sums, two divisor tensors (int16 counts, or float weight sums), the magnitude
    # scratch
    state_tensors = 5
    sign_consensus = True

    def needs_scratch(self) -> bool:
        return any(source.density < 1.0 for source in self.source_settings)

    def sparsify(self, source_index: int, delta: Tensor, inverse_rescale: bool) -> float:
        keep_largest(delta, self.source_settings[source_index].density, self.scratch)
        return 1.0

    def keep_threshold(self, source_index: int, delta: Tensor) -> float | None:
        """keep_largest's threshold, where it trims (0 < density < 1)."""
        density = self.source_settings[source_index].density
        if not 0.0 < density < 1.0 or delta.numel() == 0:
            return None
        return magnitude_threshold(delta, density, self.scratch).item()
