"""TSV-M, Task Singular Vectors merging (reference code AntoAndGar/task_singular_vectors).

k = r // N; each source keeps its top-k triplets; the stacks U_cat (m×Nk), σ_cat, V_cat (n×Nk)
are orthogonalised by their polar factors: M = polar(U_cat)·diag(σ_cat)·polar(V_cat)ᵀ. The stacks
hold N·k ≤ r columns whatever N is."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import RecipeError
from ..spectral.svd import (
    factored_svd,
    leading_triplets,
    polar,
    truncated_svd,
    truncated_svd_settings,
    without_null_components,
)
from .spectral import SpectralMethod, SpectralSettings


class TsvSettings(SpectralSettings):
    @classmethod
    def svc_auto_alpha(cls, num_sources: int) -> tuple[float, str]:
        return 1.0, "1.0 after TSV-M (the SVC authors' run.sh)"


class Tsv(SpectralMethod):
    name = "tsv"
    title = "TSV-M (Task Singular Vectors merging)"
    paper = ("Task Singular Vectors: Reducing Task Interference in Model Merging, "
             "arXiv 2412.00081; code AntoAndGar/task_singular_vectors")
    Settings = TsvSettings
    state_tensors = 2
    takes_svds = True

    @classmethod
    def check(cls, settings, shapes: dict[str, tuple[int, ...]], num_sources: int,
              options) -> None:
        for name, shape in shapes.items():
            if options.is_spectral_matrix(name, shape) and min(shape) // num_sources == 0:
                raise RecipeError(
                    f"method tsv: tensor {name} has rank {min(shape)}, fewer than the "
                    f"{num_sources} sources (k = r // N = 0); merge fewer sources or exclude it"
                )

    def begin_matrix(self, base: Tensor) -> None:
        self.shape = tuple(base.shape)
        self.per_source = min(base.shape) // self.num_sources
        if self.per_source == 0:
            self.check(self.settings, {self.tensor_name: tuple(base.shape)}, self.num_sources,
                       self.options)
        self.stack_U: list[Tensor] = []  # at most N·k ≤ r columns in all
        self.stack_S: list[Tensor] = []
        self.stack_V: list[Tensor] = []

    def update_matrix(self, pass_index: int, source_index: int, weighted: Tensor) -> None:
        U, S, V = truncated_svd(weighted, self.per_source, self.options.svd,
                                self.svd_seed(source_index))
        self.remember_source_factors({"U": U, "S": S, "V": V})
        self._place(source_index, *without_null_components(U, S, V))

    def cache_settings(self, pass_index: int, source_index: int) -> dict:
        """k = r // N: adding a source changes k, so a TSV-M merge of N + 1 sources cannot
        reuse the factors of an N-source one."""
        return truncated_svd_settings(self.options.svd, self.per_source, self.shape,
                                      self.svd_seed(source_index), self.like.dtype,
                                      self.like.device)

    def use_source_factors(self, source_index: int, factors: dict[str, Tensor]) -> None:
        self._place(source_index, *without_null_components(
            factors["U"], factors["S"], factors["V"]))

    def update_matrix_factored(self, pass_index: int, source_index: int, left: Tensor,
                               right: Tensor) -> None:
        """A LoRA source (rank r_i): its top-k from QR of the factors; beyond r_i, σ = 0."""
        U, S, V = without_null_components(*factored_svd(left, torch.ones_like(left[0]), right))
        keep = min(self.per_source, S.numel())
        self._place(source_index, *leading_triplets(U, S, V, keep))

    def _place(self, source_index: int, U: Tensor, S: Tensor, V: Tensor) -> None:
        self.stack_U.append(U)
        self.stack_S.append(S)
        self.stack_V.append(V)

    def finish_matrix(self) -> Tensor:
        stack_S = torch.cat(self.stack_S)
        if stack_S.numel() == 0:  # every source left this matrix unchanged
            self.stack_U = self.stack_S = self.stack_V = []
            return self.like.new_zeros(self.shape)
        left = polar(torch.cat(self.stack_U, dim=1))
        right = polar(torch.cat(self.stack_V, dim=1))
        self.report.factors = (left, stack_S, right)  # an SVD of M, σ unsorted
        self.stack_U = self.stack_S = self.stack_V = []
        return (left * stack_S) @ right.mT
