"""DARE (arXiv 2311.03099): drop each delta entry with probability p, rescale survivors by
1/(1-p), then task arithmetic. The random stream is seeded from (seed, tensor name, source index),
so a rerun, a different unit order or a different worker gives identical bytes."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from ..recipe import MethodSpec
from .base import MergeOptions


def dare_generator(seed: int, name: str, source_index: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\0{name}\0{source_index}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def dare_keep_mask(shape: torch.Size, p: float, generator: torch.Generator) -> Tensor:
    """True where an entry survives; drawn on the CPU so every device gets the same mask."""
    return torch.rand(shape, generator=generator) >= p


class Dare:
    passes = 1
    state_tensors = 2  # running sum and the keep mask of the current source

    def __init__(self, settings: MethodSpec, weights: Sequence[float],
                 options: MergeOptions | None = None) -> None:
        self.drop_probability = settings.p
        self.seed = settings.seed
        self.weights = list(weights)
        self.merged: Tensor | None = None

    def begin(self, name: str, base: Tensor) -> None:
        self.name = name
        self.merged = torch.zeros_like(base)

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        generator = dare_generator(self.seed, self.name, source_index)
        keep = dare_keep_mask(delta.shape, self.drop_probability, generator).to(delta.device)
        rescale = self.weights[source_index] / (1.0 - self.drop_probability)
        self.merged.add_(delta.mul_(keep), alpha=rescale)

    def finish(self) -> Tensor:
        merged, self.merged = self.merged, None
        return merged
