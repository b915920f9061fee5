"""DELLA-Merging (arXiv 2406.11617; mergekit `della`): MAGPRUNE each Δ_i (della_linear.py),
rescale the survivors, weight them, elect signs and merge the agreeing entries, divided by the
agreeing weights by default (mergekit's normalize: true)."""

from __future__ import annotations

from .consensus import ConsensusNormalize, ZeroSumSign
from .della_linear import DellaLinear, MagpruneSettings


class DellaSettings(MagpruneSettings):
    normalize: ConsensusNormalize = "weights"  # weights (mergekit true) | none | count
    zero_sum_sign: ZeroSumSign = "positive"  # positive (mergekit) | none (TIES paper)


class Della(DellaLinear):
    name = "della"
    title = "DELLA-Merging"
    Settings = DellaSettings
    state_tensors = 6  # sign consensus (4), the current source's draws, row-block temporaries
    sign_consensus = True
