"""SLERP (mergekit `slerp`): spherical interpolation from the base's weights to one source's.

mergekit's definition, per tensor (the whole tensor is one vector): v0 = B (the base), v1 = W
(the other model); cos θ = (v0/|v0|)·(v1/|v1|) with a norm ≤ 1e-8 taken as 1, clamped to
[−1, 1]; where |cos θ| > 0.9995 (nearly parallel or anti-parallel) linear interpolation
(1 − t)·v0 + t·v1, else a·v0 + b·v1 with a = sin((1−t)θ)/sin θ, b = sin(tθ)/sin θ. t = 0 gives
the base, t = 1 the source.

In raymerge's terms W = B + Δ and M = slerp(B, W) − B = c_B·B + c_Δ·Δ (sphere.py), or t·Δ on
the linear branch. One source, one pass."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Method, MethodSettings, Varying
from .checks import require_sources, require_value
from .sphere import offset_angle, offset_slerp_coefficients, vector_dims

DOT_THRESHOLD = 0.9995  # mergekit's: above it, linear interpolation
NORM_EPS = 1e-8  # mergekit's: a norm at or below it is taken as 1


class SlerpSettings(MethodSettings):
    t: Varying[float]  # required, as in mergekit: 0 keeps the base, 1 takes the source
    takes_weights = False


def _floor_norm(norm: Tensor) -> Tensor:
    return torch.where(norm > NORM_EPS, norm, 1.0)


def slerp_delta(t: float, base: Tensor, delta: Tensor) -> Tensor:
    """slerp(B, B + Δ) − B, the whole tensor as one vector (a new tensor)."""
    if base.numel() == 0:
        return delta * t
    cosine, theta = offset_angle(base, delta, vector_dims(base, "whole"), _floor_norm)
    if float(cosine.abs()) > DOT_THRESHOLD:
        return delta * t
    base_coefficient, delta_coefficient = offset_slerp_coefficients(t, theta)
    merged = base * float(base_coefficient)
    return merged.add_(delta, alpha=float(delta_coefficient))


class Slerp(Method):
    name = "slerp"
    title = "SLERP (spherical interpolation from the base to one source)"
    paper = "Shoemake, Animating Rotation with Quaternion Curves (1985); mergekit slerp"
    Settings = SlerpSettings
    state_tensors = 1  # the merged delta

    @classmethod
    def check(cls, settings, shapes: dict[str, tuple[int, ...]], num_sources: int,
              options) -> None:
        require_sources(cls.name, num_sources, (1,),
                        "it interpolates from the base (t = 0) to that source (t = 1)")
        for name in shapes:
            require_value(cls.name, settings, "t", name)

    def begin(self, name: str, base: Tensor) -> None:
        self.base = base
        self.merged: Tensor | None = None

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        self.merged = slerp_delta(self.settings.t, self.base, delta)

    def finish(self) -> Tensor:
        merged, self.merged, self.base = self.merged, None, None
        return merged
