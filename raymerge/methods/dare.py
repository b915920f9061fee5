"""DARE (arXiv 2311.03099): drop each delta entry with probability p, rescale survivors by
1/(1-p), then task arithmetic. The random stream is seeded from (seed, tensor name, source index),
so a rerun, a different unit order or a different worker gives identical bytes."""

from __future__ import annotations

import hashlib
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from .base import Method, MethodSettings, Varying

DropProbability = Annotated[float, Field(ge=0.0, lt=1.0)]


def dare_generator(seed: int, name: str, source_index: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\0{name}\0{source_index}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def dare_keep_mask(shape: torch.Size, p: float, generator: torch.Generator) -> Tensor:
    """True where an entry survives; drawn on the CPU so every device gets the same mask."""
    return torch.rand(shape, generator=generator) >= p


class DareSettings(MethodSettings):
    p: Varying[DropProbability] = 0.9  # drop probability
    seed: int = 0
    per_source = frozenset({"p"})


class Dare(Method):
    name = "dare"
    title = "DARE (drop and rescale), then task arithmetic"
    paper = "Language Models are Super Mario (DARE), arXiv 2311.03099"
    Settings = DareSettings
    state_tensors = 2  # running sum and the keep mask of the current source
    random = True

    def begin(self, name: str, base: Tensor) -> None:
        self.tensor_name = name
        self.merged = torch.zeros_like(base)

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        drop = self.source_settings[source_index].p
        generator = dare_generator(self.settings.seed, self.tensor_name, source_index)
        keep = dare_keep_mask(delta.shape, drop, generator).to(delta.device)
        rescale = self.weights[source_index] / (1.0 - drop)
        self.merged.add_(delta.mul_(keep), alpha=rescale)

    def finish(self) -> Tensor:
        merged, self.merged = self.merged, None
        return merged
