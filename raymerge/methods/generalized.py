"""mergekit's generalized task arithmetic (`generalized_task_arithmetic.py`), streamed: each
source's delta is sparsified on its own (TIES trim, DARE drops, Breadcrumbs, DELLA), its
survivors rescaled, weighted, and folded into a plain sum or a sign consensus (consensus.py) that
holds a fixed number of tensors whatever the number of sources:

    c_i = w_i · ρ_i · sparsify(Δ_i)         ρ_i: the survivors' rescaling (sparsify.py)
    M   = normalize(Σ_i c_i)                or, under sign consensus, normalize(Σ agreeing c_i)

A method of the family declares its sparsification (`sparsify`) and whether it elects signs;
its settings hold `normalize` and `rescale` with its own defaults."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import Method
from .consensus import SignConsensus, linear_normalized
from .sparsify import l1_norm, l1_rescale_factor, source_generator


class GeneralizedTaskArithmetic(Method):
    """Base of the family: subclasses define `sparsify` and set `sign_consensus`."""

    sign_consensus: ClassVar[bool] = False

    def begin(self, name: str, base: Tensor) -> None:
        self.tensor_name = name
        if self.sign_consensus:
            self.consensus = SignConsensus(base, self.settings.normalize,
                                           self.settings.zero_sum_sign, self.weights)
        else:
            self.merged = torch.zeros_like(base)
        self.scratch = torch.empty_like(base) if self.needs_scratch() else None

    def needs_scratch(self) -> bool:
        """Whether `sparsify` takes order statistics of |Δ_i| (a buffer for the magnitudes)."""
        return False

    def generator(self, source_index: int) -> torch.Generator:
        """The random stream of one source for this tensor (seeded like DARE)."""
        return source_generator(self.settings.seed, self.tensor_name, source_index)

    def sparsify(self, source_index: int, delta: Tensor, inverse_rescale: bool) -> float:
        """Sparsify `delta` in place; return the factor that rescales its survivors when
        `inverse_rescale` asks for it (1 when there is none, or it was applied per entry)."""
        raise NotImplementedError

    def keep_threshold(self, source_index: int, delta: Tensor) -> float | None:
        """For a sparsification that only keeps the entries at or above a magnitude (TIES's
        trim), that magnitude: the engine then trims while it sums, in one pass. None: none."""
        return None

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        rescale = self.settings.rescale
        if self.sign_consensus and rescale == "none":
            threshold = self.keep_threshold(source_index, delta)
            if threshold is not None:
                weight = self.weights[source_index]
                self.consensus.add(delta, weight, keep_threshold=threshold, scale=weight)
                return
        before = l1_norm(delta) if rescale == "l1" else 0.0
        factor = self.sparsify(source_index, delta, inverse_rescale=rescale == "inverse")
        if rescale == "l1":
            factor = l1_rescale_factor(before, l1_norm(delta))
        weight = self.weights[source_index]
        if self.sign_consensus:
            if weight * factor != 1.0:
                delta.mul_(weight * factor)
            self.consensus.add(delta, weight)
        else:
            self.merged.add_(delta, alpha=weight * factor)

    def finish(self) -> Tensor:
        self.scratch = None
        if self.sign_consensus:
            merged, self.consensus = self.consensus.result(), None
            return merged
        merged, self.merged = self.merged, None
        return linear_normalized(merged, self.weights) if self.settings.normalize else merged
