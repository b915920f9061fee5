"""RAM and RAM+ tensor-local (arXiv 2601.13572; mergekit `ram`, `ramplus_tl`): Reinforced Agent
Merging, which averages a parameter only over the task vectors that changed it.

mergekit's definition, per entry: m_i = |Δ_i| > epsilon (source i changed the entry),
c = Σ m_i (how many did). Where c = 1 the one change is kept whole, where c > 1 the changes are
averaged: M = Σ_i m_i·Δ_i / max(c, 1).

RAM+ (tensor-local) scales each source's unique changes up by how much it shares with others:
with shared_i = #{entries: m_i, c > 1} and unique_i = #{entries: m_i, c = 1} over the tensor,
ρ_i = shared_i / max(unique_i, epsilon), λ_i = 1 + r·clamp(ρ_i, 0, alpha), and
M = Σ_i m_i·Δ_i·(λ_i where c = 1, 1/c where c > 1).

RAM is one pass with a running masked sum and a count. RAM+ needs c before any λ_i: pass 1
counts and sums the changes, pass 2 sums them again, each source's scaled by its λ_i; the
merge takes the second sum where c = 1 and the first ÷ c elsewhere. Counts are int16
(N < 32768)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from .base import Method, MethodSettings, Varying

NonNegative = Annotated[float, Field(ge=0.0)]


class RamSettings(MethodSettings):
    epsilon: Varying[NonNegative] = 1e-5  # a change of at most this magnitude is no change
    takes_weights = False


class RamPlusSettings(RamSettings):
    r: Varying[NonNegative] = 0.1  # how much a source's sharing scales its unique changes
    alpha: Varying[NonNegative] = 0.2  # the most ρ_i counts for


class Ram(Method):
    name = "ram"
    title = "RAM (Reinforced Agent Merging)"
    paper = "Reinforced Agent Merging, arXiv 2601.13572; mergekit ram"
    Settings = RamSettings
    state_tensors = 2  # the masked sum and the int16 count

    def begin(self, name: str, base: Tensor) -> None:
        self.merged = torch.zeros_like(base)
        self.count = torch.zeros_like(base, dtype=torch.int16)

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        changed = delta.abs() > self.settings.epsilon
        self.count += changed
        self.merged.add_(delta.mul_(changed))

    def finish(self) -> Tensor:
        merged, count = self.merged, self.count
        self.merged = self.count = None
        return merged.div_(count.clamp_(min=1))


class RamPlus(Method):
    name = "ramplus_tl"
    title = "RAM+ tensor-local (RAM with unique changes scaled by each source's overlap)"
    paper = "Reinforced Agent Merging, arXiv 2601.13572; mergekit ramplus_tl"
    Settings = RamPlusSettings
    max_passes = 2
    state_tensors = 3  # the masked sum, the boosted masked sum, the int16 count

    def begin(self, name: str, base: Tensor) -> None:
        self.count = torch.zeros_like(base, dtype=torch.int16)
        self.changed_sum = torch.zeros_like(base)  # Σ m_i·Δ_i: the merge where c > 1 (÷ c)
        self.boosted_sum: Tensor | None = None  # Σ λ_i·m_i·Δ_i: the merge where c = 1
        self.unique: Tensor | None = None

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        changed = delta.abs() > self.settings.epsilon
        changes = delta.mul_(changed)
        if pass_index == 0:
            self.count += changed
            self.changed_sum.add_(changes)
            return
        if self.unique is None:  # the counts are final
            self.unique = self.count == 1
            self.boosted_sum = torch.zeros_like(changes)
        # where c = 1 one source changed the entry, so the sum there is λ_i·Δ_i of that source
        unique_changes = int((changed & self.unique).sum())
        shared_changes = int(changed.sum()) - unique_changes  # a changed entry has c ≥ 1
        overlap = shared_changes / max(unique_changes, self.settings.epsilon)
        boost = 1 + self.settings.r * min(max(overlap, 0.0), self.settings.alpha)
        self.boosted_sum.add_(changes, alpha=boost)

    def finish(self) -> Tensor:
        merged = torch.where(self.unique, self.boosted_sum,
                             self.changed_sum.div_(self.count.clamp_(min=1)))
        self.changed_sum = self.boosted_sum = self.count = self.unique = None
        return merged
