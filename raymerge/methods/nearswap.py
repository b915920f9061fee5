"""NearSwap (mergekit `nearswap`): take the source's value where it is close to the base's.

mergekit's definition, per entry, with a = B (the base) and b = W (the other model):
w = clamp(t / max(|a − b|, 1e-6), 0, 1); result w·b + (1 − w)·a. So M = w·Δ with
w = clamp(t / max(|Δ|, 1e-6), 0, 1): entries that differ by at most t are taken whole, larger
differences in proportion t/|Δ|. One source, one pass."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import Tensor

from .base import Method, MethodSettings, Varying
from .checks import require_sources, require_value

MIN_DIFFERENCE = 1e-6  # mergekit's guard on |a − b|


class NearswapSettings(MethodSettings):
    # required, as in mergekit: the distance up to which the source's value is taken whole
    t: Varying[Annotated[float, Field(ge=0.0)]]
    takes_weights = False


class Nearswap(Method):
    name = "nearswap"
    title = "NearSwap (the source's values where they are near the base's)"
    paper = "mergekit nearswap (alchemonaut/QuartetAnemoi-70B-t0.0001)"
    Settings = NearswapSettings
    state_tensors = 1  # the merged delta

    @classmethod
    def check(cls, settings, shapes: dict[str, tuple[int, ...]], num_sources: int,
              options) -> None:
        require_sources(cls.name, num_sources, (1,),
                        "it swaps the base's values for that source's where they are near")
        for name in shapes:
            require_value(cls.name, settings, "t", name)

    def begin(self, name: str, base: Tensor) -> None:
        self.merged: Tensor | None = None

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        swap = delta.abs().clamp_(min=MIN_DIFFERENCE).reciprocal_().mul_(self.settings.t)
        self.merged = swap.clamp_(0.0, 1.0).mul_(delta)

    def finish(self) -> Tensor:
        merged, self.merged = self.merged, None
        return merged
