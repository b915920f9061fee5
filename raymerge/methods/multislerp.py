"""Multi-SLERP (mergekit `multislerp`): barycentric interpolation of the task vectors on the
sphere, with the base as the origin (mergekit with a base_model).

mergekit's definition: w_i normalised to sum 1 (normalize_weights); u_i = Δ_i/(|Δ_i| + eps)
(each whole tensor one vector); m = Σ w_i·u_i, m̂ = m/|m|; the tangent vectors
t_i = u_i − (u_i·m̂)·m̂ are averaged, T = Σ w_i·t_i, and mapped back by the exponential map,
r = m̂·cos|T| + T·sin|T|/|T| (|T| + eps in place of |T|); the result is r·Σ w_i·|Δ_i|.

T is zero: Σ w_i·t_i = m − (m·m̂)·m̂ = m − |m|·m̂ = 0, so r = m̂·cos(eps) = m̂ and
M = (Σ w_i·|Δ_i|)·m/|m|, which one pass with one running sum gives (mergekit's T holds only
rounding error). Special cases as mergekit: one source, M = Δ_1 (weights unused); |m| < eps
with two sources, the linear M = w_1·Δ_1 + w_2·Δ_2; with more, an error."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from ..errors import RecipeError
from .base import Method, MethodSettings, Varying
from .sphere import norm as vector_norm


class MultislerpSettings(MethodSettings):
    normalize_weights: bool = True  # divide the weights by their sum
    eps: Varying[Annotated[float, Field(ge=0.0)]] = 1e-8  # mergekit's guard in u_i and |m|


class Multislerp(Method):
    name = "multislerp"
    title = "Multi-SLERP (barycentric interpolation of task vectors on the sphere)"
    paper = "Goddard, multislerp (goddard.blog/posts/multislerp-wow-what-a-cool-idea); mergekit"
    Settings = MultislerpSettings
    state_tensors = 2  # Σ w_i·u_i, and Σ w_i·Δ_i for the two-source fallback

    def begin(self, name: str, base: Tensor) -> None:
        self.tensor_name = name
        total = sum(self.weights)
        if self.settings.normalize_weights and total == 0:
            raise RecipeError(
                f"method multislerp: tensor {name}: the source weights sum to 0, so they cannot "
                "be normalised; change the weights or set normalize_weights: false")
        self.normalized = ([w / total for w in self.weights] if self.settings.normalize_weights
                           else list(self.weights))
        self.unit_sum = torch.zeros_like(base)
        # the fallback needs the weighted sum itself, and mergekit has it for two sources only
        self.weighted_sum = torch.zeros_like(base) if self.num_sources == 2 else None
        self.mean_norm = 0.0  # Σ w_i·|Δ_i|

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        if self.num_sources == 1:  # mergekit returns the one model as it is
            self.unit_sum.copy_(delta)
            return
        weight = self.normalized[source_index]
        norm = vector_norm(delta)
        self.mean_norm += weight * norm
        if self.weighted_sum is not None:
            self.weighted_sum.add_(delta, alpha=weight)
        # w_i·u_i rounded on its own, as mergekit forms it, then added: a fused multiply-add
        # would leave rounding residue where opposite task vectors cancel exactly
        self.unit_sum.add_(delta.mul_(weight / (norm + self.settings.eps)))

    def finish(self) -> Tensor:
        merged, self.unit_sum = self.unit_sum, None
        weighted_sum, self.weighted_sum = self.weighted_sum, None
        if self.num_sources == 1:
            return merged
        direction_norm = vector_norm(merged)
        if direction_norm < self.settings.eps:
            if weighted_sum is not None:
                return weighted_sum
            raise RecipeError(
                f"method multislerp: tensor {self.tensor_name}: the weighted sum of the sources' "
                "unit task vectors is zero (opposite task vectors whose weights balance); "
                "change the weights or leave a source out")
        return merged.mul_(self.mean_norm / direction_norm)
