"""NuSLERP (mergekit `nuslerp`): spherical interpolation between two models, with t taken from
their weights, t = w_1/(w_0 + w_1) (0.5 where |w_0 + w_1| < 1e-6).

mergekit's definition, for each vector (nuslerp_flatten: the whole tensor; else each row, or
each column with nuslerp_row_wise): v̂ = v / max(|v|, 1e-7); cos θ = v̂0·v̂1 clamped to [−1, 1];
where 1 − cos²θ ≤ 1e-16 (parallel or anti-parallel) (1 − t)·v0 + t·v1, else
(sin((1−t)θ)·v0 + sin(tθ)·v1)/sin θ.

Its two uses map onto raymerge's base + sources:
- with a base model (mergekit's base_model and two other models): two sources; v0 = Δ_0 and
  v1 = Δ_1 are the task vectors and M = nuslerp(Δ_0, Δ_1); w_0, w_1 are the sources' weights.
- without one (mergekit: two models, no base_model): one source; the base is the first model,
  v0 = B, v1 = B + Δ, and M = nuslerp(B, B + Δ) − B; w_0 is `base_weight`, w_1 the source's
  weight.
Either way the first model's values are held until the second's arrive: one pass, one tensor."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import RecipeError
from .base import Method, MethodSettings, Varying
from .checks import require_sources
from .sphere import (
    offset_angle,
    offset_slerp_coefficients,
    pair_angle,
    slerp_coefficients,
    vector_dims,
)

NORM_FLOOR = 1e-7  # mergekit's normalisation guard: v / max(|v|, 1e-7)
COLINEAR_EPS = 1e-8  # mergekit's: linear where 1 − cos²θ ≤ eps²
ZERO_TOTAL = 1e-6  # mergekit's: t = 0.5 where the weights sum to about zero


class NuslerpSettings(MethodSettings):
    nuslerp_flatten: bool = True  # the whole tensor is one vector
    nuslerp_row_wise: bool = False  # without flatten: columns (dim 0) instead of rows
    # w_0 when nuslerp interpolates the base and one source (the base is mergekit's first
    # model); with two sources their weights are w_0 and w_1 and this key is refused
    base_weight: Varying[float] | None = None


def interpolation_fraction(first_weight: float, second_weight: float) -> float:
    total = first_weight + second_weight
    return 0.5 if abs(total) < ZERO_TOTAL else second_weight / total


def _floor_norm(norm: Tensor) -> Tensor:
    return norm.clamp(min=NORM_FLOOR)


class Nuslerp(Method):
    name = "nuslerp"
    title = "NuSLERP (spherical interpolation of two models, t from their weights)"
    paper = "mergekit nuslerp"
    Settings = NuslerpSettings
    state_tensors = 1  # the first source's delta, which becomes the merged delta

    @classmethod
    def check(cls, settings, shapes: dict[str, tuple[int, ...]], num_sources: int,
              options) -> None:
        require_sources(cls.name, num_sources, (1, 2),
                        "two: the task vectors of two models from the base; one: the base and "
                        "that model, as mergekit's nuslerp without base_model")
        if num_sources == 2 and settings.base_weight is not None:
            raise RecipeError(
                "method nuslerp: base_weight applies only to one source (the base interpolated "
                "with it); with two sources t comes from their weights: remove base_weight")

    def begin(self, name: str, base: Tensor) -> None:
        self.base = base
        self.layout = ("whole" if self.settings.nuslerp_flatten
                       else "columns" if self.settings.nuslerp_row_wise else "rows")
        self.first: Tensor | None = None
        self.merged: Tensor | None = None

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        if self.num_sources == 1:
            base_weight = 1.0 if self.settings.base_weight is None else self.settings.base_weight
            t = interpolation_fraction(base_weight, self.weights[0])
            self.merged = self._from_base(t, delta)
        elif source_index == 0:
            self.first = delta.clone()
        else:
            t = interpolation_fraction(*self.weights)
            self.merged = self._between_task_vectors(t, self.first, delta)
            self.first = None

    def _from_base(self, t: float, delta: Tensor) -> Tensor:
        """nuslerp(B, B + Δ) − B = c_B·B + c_Δ·Δ per vector, t·Δ where colinear."""
        base = self.base
        _, theta = offset_angle(base, delta, vector_dims(base, self.layout), _floor_norm)
        colinear = torch.sin(theta).square() <= COLINEAR_EPS**2
        safe_theta = torch.where(colinear, torch.pi / 2, theta)  # finite on the unused branch
        base_coefficient, delta_coefficient = offset_slerp_coefficients(t, safe_theta)
        base_coefficient = torch.where(colinear, 0.0, base_coefficient).to(base.dtype)
        delta_coefficient = torch.where(colinear, t, delta_coefficient).to(base.dtype)
        return (base * base_coefficient).addcmul_(delta, delta_coefficient)

    def _between_task_vectors(self, t: float, first: Tensor, second: Tensor) -> Tensor:
        """nuslerp(Δ_0, Δ_1) per vector, written into `first`."""
        _, theta = pair_angle(first, second, vector_dims(first, self.layout), _floor_norm)
        colinear = torch.sin(theta).square() <= COLINEAR_EPS**2
        first_coefficient, second_coefficient = slerp_coefficients(
            t, torch.where(colinear, torch.pi / 2, theta))  # finite on the unused branch
        first_coefficient = torch.where(colinear, 1 - t, first_coefficient).to(first.dtype)
        second_coefficient = torch.where(colinear, t, second_coefficient).to(first.dtype)
        return first.mul_(first_coefficient).addcmul_(second, second_coefficient)

    def finish(self) -> Tensor:
        merged, self.merged, self.base = self.merged, None, None
        return merged
