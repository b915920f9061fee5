"""AXIS stage 1 (arXiv 2508.19353, Algorithm 1): every source's rank-one components
(σ_ij, u_ij, v_ij) compete in one pool per matrix and the K with the largest σ are kept;
M = Σ_selected σ·u·vᵀ, also stored as its re-orthogonalised SVD U_t·diag(σ_t)·V_tᵀ for tuning.

Streamed: only a source's own top-K components can be among the global top K, so the pool holds
at most K candidates: each new source's top-K triplets are merged into it and the K largest kept.
Ties in σ keep the earlier source's component, which is also the batch order."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import AfterValidator
from torch import Tensor

from ..errors import RecipeError
from ..spectral.svd import (
    factored_svd,
    leading_triplets,
    truncated_svd,
    truncated_svd_settings,
)
from .base import Statistic, Varying
from .spectral import SpectralMethod, SpectralSettings


def components_to_keep(k: int | float, full_rank: int) -> int:
    """K from the recipe's k: an integer count, or a fraction of r = min(m, n)."""
    if isinstance(k, bool) or k <= 0:
        raise RecipeError(f"method.k must be a positive integer or a fraction in (0, 1], got {k}")
    if isinstance(k, float):
        if k > 1:
            raise RecipeError(f"method.k = {k} as a fraction of the rank must be at most 1")
        return max(1, int(k * full_rank))
    return k


def _k_range(k: int | float) -> int | float:
    if isinstance(k, bool) or k <= 0 or (isinstance(k, float) and k > 1):
        raise ValueError("k must be a positive integer, or a fraction in (0, 1] of the rank")
    return k


class AxisSettings(SpectralSettings):
    # components kept per matrix: a count, or a fraction of r = min(m, n)
    k: Varying[Annotated[int | float, AfterValidator(_k_range)]] = 0.1


class Axis(SpectralMethod):
    name = "axis"
    title = "AXIS stage 1 (the K largest rank-one components across sources)"
    paper = "AXIS, arXiv 2508.19353, Algorithm 1"
    Settings = AxisSettings
    state_tensors = 2
    takes_svds = True
    statistics = (
        Statistic("axis_rank", "int", "rank", "d"),
        Statistic("axis_energy_kept", "float", "energy", ".3f"),
        Statistic("axis_selected_per_source", "int_list", "selected per source"),
    )

    @classmethod
    def check(cls, settings, shapes: dict[str, tuple[int, ...]], num_sources: int,
              options) -> None:
        """K larger than all components of a matrix cannot be satisfied: refuse before work."""
        for name, shape in shapes.items():
            if not options.is_spectral_matrix(name, shape):
                continue
            keep = components_to_keep(settings.k, min(shape))
            if keep > num_sources * min(shape):
                raise RecipeError(
                    f"method.k = {settings.k}: K = {keep} is larger than the {num_sources} × "
                    f"{min(shape)} components of tensor {name}; lower k"
                )

    def begin_matrix(self, base: Tensor) -> None:
        self.keep = components_to_keep(self.settings.k, min(base.shape))
        self.shape = tuple(base.shape)
        rows, cols = base.shape
        self.pool_U = base.new_zeros(rows, 0)
        self.pool_S = base.new_zeros(0)
        self.pool_V = base.new_zeros(cols, 0)
        self.pool_source = torch.zeros(0, dtype=torch.long)
        self.total_energy = 0.0

    def update_matrix(self, pass_index: int, source_index: int, weighted: Tensor) -> None:
        energy = weighted.square().sum().double()
        U, S, V = truncated_svd(weighted, self.keep, self.options.svd, self.svd_seed(source_index))
        self.remember_source_factors({"U": U, "S": S, "V": V, "energy": energy})
        self.total_energy += float(energy)
        self._add_to_pool(source_index, U, S, V)

    def cache_settings(self, pass_index: int, source_index: int) -> dict:
        return truncated_svd_settings(self.options.svd, self.keep, self.shape,
                                      self.svd_seed(source_index), self.like.dtype,
                                      self.like.device)

    def use_source_factors(self, source_index: int, factors: dict[str, Tensor]) -> None:
        self.total_energy += float(factors["energy"])
        self._add_to_pool(source_index, factors["U"], factors["S"], factors["V"])

    def update_matrix_factored(self, pass_index: int, source_index: int, left: Tensor,
                               right: Tensor) -> None:
        """A LoRA source: its components from QR of the factors, never an m×n matrix."""
        U, S, V = factored_svd(left, torch.ones_like(left[0]), right)
        self.total_energy += float(S.square().sum())
        self._add_to_pool(source_index, *leading_triplets(U, S, V, self.keep))

    def _add_to_pool(self, source_index: int, U: Tensor, S: Tensor, V: Tensor) -> None:
        candidates_S = torch.cat([self.pool_S, S])
        # stable sort: on equal σ the pool (earlier sources) stays first, as in the batch order
        order = torch.sort(candidates_S, descending=True, stable=True).indices[: self.keep]
        self.pool_U = torch.cat([self.pool_U, U], dim=1)[:, order]
        self.pool_V = torch.cat([self.pool_V, V], dim=1)[:, order]
        self.pool_S = candidates_S[order]
        sources = torch.full((S.numel(),), source_index, dtype=torch.long)
        self.pool_source = torch.cat([self.pool_source, sources])[order.cpu()]

    def finish_matrix(self) -> Tensor:
        if self.pool_S.numel() < self.keep:
            raise RecipeError(
                f"method.k: K = {self.keep} is larger than the {self.pool_S.numel()} components "
                f"of tensor {self.tensor_name} across all sources; lower k"
            )
        merged = (self.pool_U * self.pool_S) @ self.pool_V.mT
        self.report.factors = tuple(factored_svd(self.pool_U, self.pool_S, self.pool_V))
        self.report.save_factors = True
        kept_energy = float(self.pool_S.square().sum())
        self.report.stats = {
            "axis_selected_per_source": torch.bincount(
                self.pool_source, minlength=self.num_sources).tolist(),
            "axis_energy_kept": kept_energy / self.total_energy if self.total_energy else 0.0,
            "axis_rank": int(self.pool_S.numel()),
        }
        del self.pool_U, self.pool_S, self.pool_V
        return merged
