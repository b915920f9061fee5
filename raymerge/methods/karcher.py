"""Karcher mean (mergekit `karcher`): the weighted Riemannian mean of the models' weights on the
unit sphere, found by fixed-point iteration, re-streaming the sources once per iteration.

mergekit's definition, with every whole tensor one point: the points are the models' weights,
the base among them (mergekit adds base_model to the models), so here B and W_i = B + Δ_i, P =
N + 1 points, each of weight α = 1/P (mergekit ignores model weights). n_p = |W_p|, u_p = W_p/n_p;
the valid points have n_p > tol, their weights renormalised to a_p = 1/#valid. Start
m = Σ a_p·u_p / |Σ a_p·u_p| (u of the first valid point where that norm < tol); then up to
max_iter times: T = Σ a_p·(θ_p/sin θ_p)·(u_p − cos θ_p·m) over the points with θ_p ≥ tol,
cos θ_p = clamp(m·u_p, −1, 1); stop if |T| < tol; m ← cos|T|·m + sin|T|·T/|T|, renormalised.
The result is (Σ_p α·n_p)·m (0 when no point is valid), so M = (Σ α·n_p)·m − B.

Streamed: pass 0 takes the norms (P numbers) and Σ u_p; pass k ≥ 1 is iteration k, with m and
T as the only full-size state (the base's term of T is formed in the engine's delta buffer
after the last source's). Once |T| < tol the remaining passes read nothing
(`cached_update`: their contribution is known, none). θ_p is atan2(|u_p − cos θ_p·m|, cos θ_p):
the same angle as acos, but accurate when u_p and m are nearly parallel (as fine-tunes are)."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from .base import Method, MethodSettings, Varying
from .sphere import dot, norm

DEFAULT_MAX_ITER = 10


class KarcherSettings(MethodSettings):
    # iterations, each one pass over the sources; a count (it sets the passes), not Varying:
    # a gradient over the layers would interpolate it to fractions
    max_iter: Annotated[int, Field(ge=0)] = DEFAULT_MAX_ITER
    tol: Varying[Annotated[float, Field(gt=0.0)]] = 1e-5  # norms, angles and |T| below it: 0
    takes_weights = False


class Karcher(Method):
    name = "karcher"
    title = "Karcher mean (Riemannian mean of the weights on the sphere)"
    paper = "mergekit karcher (reference arXiv 2603.04972)"
    Settings = KarcherSettings
    max_passes = 1 + DEFAULT_MAX_ITER  # the plan's estimate; a larger max_iter takes more
    state_tensors = 2  # the mean m and the tangent T

    def begin(self, name: str, base: Tensor) -> None:
        self.base = base
        self.passes = 1 + self.settings.max_iter
        self.tol = self.settings.tol
        self.norms: list[float] = []  # n_p of every point, the base's first
        self.mean = torch.zeros_like(base)  # pass 0: Σ u_p over the valid points
        self.tangent: Tensor | None = None
        self.first_unit: Tensor | None = None  # the fallback start, kept only if B is not valid
        self.valid_count = 0  # points with n_p > tol, once pass 0 is done
        self.converged = False
        self._add_to_mean(base)

    def cached_update(self, pass_index: int, source_index: int) -> bool:
        """Once the iteration has converged, later passes need nothing from the sources."""
        return self.converged

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        if self.converged:
            return
        point = delta.add_(self.base)  # W_i, in the engine's buffer
        last = source_index == self.num_sources - 1
        if pass_index == 0:
            self._add_to_mean(point)
            if last:
                self._start_iteration()
            return
        if source_index == 0:
            self.tangent = torch.zeros_like(self.mean)
        self._add_to_tangent(point, self.norms[1 + source_index])
        if last:  # the base's term, in the buffer the last source no longer needs
            self._add_to_tangent(delta.copy_(self.base), self.norms[0])
            self._step()

    def _add_to_mean(self, point: Tensor) -> None:
        point_norm = norm(point)
        self.norms.append(point_norm)
        if point_norm <= self.tol:
            return
        if self.first_unit is None and self.norms[0] <= self.tol:
            self.first_unit = point / point_norm
        self.mean.add_(point, alpha=1.0 / point_norm)

    def _start_iteration(self) -> None:
        """m = Σ a_p·u_p normalised (the first valid u where that sum is about zero)."""
        self.valid_count = valid = sum(point_norm > self.tol for point_norm in self.norms)
        if valid == 0:
            self.converged = True  # the result is 0
            return
        self.mean.div_(valid)
        mean_norm = norm(self.mean)
        if mean_norm < self.tol:
            first = self.first_unit if self.first_unit is not None else self.base / self.norms[0]
            self.mean.copy_(first)
        else:
            self.mean.div_(mean_norm)
        self.first_unit = None
        self.converged = self.settings.max_iter == 0

    def _add_to_tangent(self, point: Tensor, point_norm: float) -> None:
        """a_p·(θ_p/sin θ_p)·(u_p − cos θ_p·m) into T; `point` is overwritten."""
        if point_norm <= self.tol:
            return
        unit = point.div_(point_norm)
        cosine = min(1.0, max(-1.0, dot(self.mean, unit)))
        residual = unit.sub_(self.mean, alpha=cosine)  # its norm is sin θ_p
        sine = norm(residual)
        theta = math.atan2(sine, cosine)
        if theta < self.tol:
            return
        self.tangent.add_(residual, alpha=theta / sine / self.valid_count)

    def _step(self) -> None:
        """m ← cos|T|·m + sin|T|·T/|T|, renormalised; converged once |T| < tol."""
        tangent, self.tangent = self.tangent, None
        step = norm(tangent)
        if step < self.tol:
            self.converged = True
            return
        self.mean.mul_(math.cos(step)).add_(tangent, alpha=math.sin(step) / step)
        mean_norm = norm(self.mean)
        if mean_norm > self.tol:
            self.mean.div_(mean_norm)

    def finish(self) -> Tensor:
        scale = sum(self.norms) / len(self.norms)  # Σ α·n_p, α = 1/P over every point
        merged, self.mean = self.mean, None
        if self.valid_count == 0:
            merged.zero_()
        merged.mul_(scale).sub_(self.base)
        self.base = None
        return merged
