"""STAR, Spectral Truncation and Rescale (arXiv 2502.10339), as the SVC authors' `STAR` in
lyymuwu/SVC merge_func.py.

Per source and matrix: the exact SVD Δ_i = U·diag(σ)·Vᵀ; keep the smallest r with
cumsum(σ)[r−1] / Σσ ≥ eta/100 (at least one component); rescale the kept σ by Σσ / Σσ[:r], so
the nuclear norm is unchanged; reconstruct. M = the mean over sources of the reconstructions:
one running sum. Sources are the weighted deltas w_i·Δ_i (STAR of w·Δ is w·STAR(Δ)); tensors
that are not matrices, and excluded ones, are the mean of w_i·Δ_i. The truncation needs the
whole spectrum (Σσ), so the SVD is always the exact one."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from ..spectral.svd import exact_svd, factored_svd, leading_triplets
from .base import MethodSettings, Statistic, Varying
from .spectral import SpectralMethod

# Σσ at or below this is a zero matrix (the authors' `eps`): it contributes nothing
NUCLEAR_NORM_FLOOR = 1e-12


class StarSettings(MethodSettings):
    eta: Varying[Annotated[float, Field(ge=0, le=100)]] = 40.0  # % of the nuclear norm kept
    per_source = frozenset({"eta"})


def truncate_and_rescale(U: Tensor, S: Tensor, V: Tensor, eta: float
                         ) -> tuple[Tensor, Tensor, Tensor] | None:
    """The kept triplets (U_r, rescaled σ_r, V_r), or None for a matrix with Σσ ≈ 0."""
    total = S.sum()
    if float(total) <= NUCLEAR_NORM_FLOOR:
        return None
    fraction = torch.cumsum(S, dim=0) / total
    threshold = torch.tensor(eta / 100, dtype=S.dtype, device=S.device)
    # the first index whose cumulative fraction reaches eta/100, as torch.searchsorted finds
    # it; past the end (rounding, eta = 100) all components are kept
    rank = min(int(torch.searchsorted(fraction, threshold)) + 1, S.numel())
    kept = S[:rank]
    kept_sum = kept.sum()
    if float(kept_sum) <= NUCLEAR_NORM_FLOOR:
        return None
    return leading_triplets(U, kept * (total / kept_sum), V, rank)


class Star(SpectralMethod):
    name = "star"
    title = "STAR (spectral truncation and rescale, then the mean)"
    paper = ("STAR: Spectral Truncation and Rescale for Model Merging, arXiv 2502.10339; "
             "code as in lyymuwu/SVC merge_func.py")
    Settings = StarSettings
    state_tensors = 3  # the running sum, and U and V of the current source's SVD
    takes_svds = True
    statistics = (Statistic("star_rank_per_source", "int_list", "rank per source"),)

    def begin_matrix(self, base: Tensor) -> None:
        self.shape = tuple(base.shape)
        self.merged = torch.zeros_like(base)
        self.kept_ranks = [0] * self.num_sources

    def update_matrix(self, pass_index: int, source_index: int, weighted: Tensor) -> None:
        U, S, V = exact_svd(weighted)
        kept = truncate_and_rescale(U, S, V, self.source_settings[source_index].eta)
        del U, S, V
        if kept is None:
            kept = (self.like.new_zeros(self.shape[0], 0), self.like.new_zeros(0),
                    self.like.new_zeros(self.shape[1], 0))
        self.remember_source_factors(dict(zip("USV", kept)))
        self._add(source_index, *kept)

    def update_matrix_factored(self, pass_index: int, source_index: int, left: Tensor,
                               right: Tensor) -> None:
        """A LoRA source (rank r_i): its SVD from QR of the factors; the σ beyond r_i are 0 and
        change neither Σσ nor the truncation."""
        U, S, V = factored_svd(left, torch.ones_like(left[0]), right)
        kept = truncate_and_rescale(U, S, V, self.source_settings[source_index].eta)
        if kept is not None:
            self._add(source_index, *kept)

    def cache_settings(self, pass_index: int, source_index: int) -> dict:
        return {"op": "star", "eta": self.source_settings[source_index].eta,
                "dtype": str(self.like.dtype), "device": self.like.device.type, "path": "exact"}

    def use_source_factors(self, source_index: int, factors: dict[str, Tensor]) -> None:
        self._add(source_index, factors["U"], factors["S"], factors["V"])

    def _add(self, source_index: int, U: Tensor, S: Tensor, V: Tensor) -> None:
        self.kept_ranks[source_index] = S.numel()
        self.merged.addmm_(U * S, V.mT)

    def finish_matrix(self) -> Tensor:
        merged, self.merged = self.merged, None
        self.report.stats = {"star_rank_per_source": list(self.kept_ranks)}
        return merged.div_(self.num_sources)
