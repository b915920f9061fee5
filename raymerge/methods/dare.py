"""DARE (arXiv 2311.03099): drop each delta entry with probability p, rescale survivors by
1/(1-p), then task arithmetic. The random stream is seeded from (seed, tensor name, source index),
so a rerun, a different unit order or a different worker gives identical bytes.

mergekit's `dare_linear` is this with p = 1 − density, `rescale: l1` (mergekit matches each
source's L1 norm instead of dividing by 1 − p) and its `normalize` (divide by Σ w_i)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import Tensor

from .base import MethodSettings, Varying
from .generalized import GeneralizedTaskArithmetic
from .sparsify import Rescale, random_keep_mask
from .sparsify import source_generator as dare_generator

__all__ = ["Dare", "DareSettings", "DropProbability", "dare_generator", "dare_keep_mask"]

DropProbability = Annotated[float, Field(ge=0.0, lt=1.0)]
dare_keep_mask = random_keep_mask


class DareSettings(MethodSettings):
    p: Varying[DropProbability] = 0.9  # drop probability
    seed: int = 0
    rescale: Rescale = "inverse"  # inverse: 1/(1 − p) (DARE paper) | l1 (mergekit) | none
    normalize: bool = False  # divide M by Σ w_i (mergekit normalize)
    per_source = frozenset({"p"})


class Dare(GeneralizedTaskArithmetic):
    name = "dare"
    title = "DARE (drop and rescale), then task arithmetic"
    paper = "Language Models are Super Mario (DARE), arXiv 2311.03099"
    Settings = DareSettings
    state_tensors = 2  # running sum and the keep mask of the current source
    random = True

    def sparsify(self, source_index: int, delta: Tensor, inverse_rescale: bool) -> float:
        drop = self.source_settings[source_index].p
        keep = random_keep_mask(delta.shape, drop, self.generator(source_index))
        delta.mul_(keep.to(delta.device))
        return 1.0 / (1.0 - drop) if inverse_rescale else 1.0
