"""ACE-Merging (arXiv 2603.02945), as the official code computes it (unravel-xu/ACE-Merging,
src/merge/strategy.py, `ace_merging`), streamed. docs/notes/ace.md says where that code departs
from the paper's equations; raymerge follows the code, whose numbers the paper reports.

Per matrix, for the weighted task matrices Δ_1..Δ_N (m × n), ε (1e-2) and k_frac (0.3):

    t_i = ‖Δ_i‖²_F (un-centred);  heterogeneous ⇔ var(log t) / mean(log t)² > 0.3
    Δ̄_i = Δ_i minus its mean row;  C_i = Δ̄_iᵀΔ̄_i;  τ_i = tr(C_i) + 1e-12
    S_i = C_i/τ_i, ε_i = ε/τ_i (heterogeneous);  S_i = C_i, ε_i = ε (otherwise)
    A = Σ_i (S_i + ε_i·I) + 1·cᵀ,  c = the column means of Σ_i S_i (÷ mean t, heterogeneous)
    M = (Σ_i Δ̄_i·(S_i + ε_i·I))·A⁻¹
    heterogeneous: R = Σ_i Δ_i·(S_i − (1/N)·Σ_j (S_j + ε_j·I)) + M;  U, σ, Vᵀ = SVD(R)
                   M ← M + mean(σ[:k])·U_k·V_kᵀ,  k = ⌊k_frac·min(m, n)⌋

The official code holds every Δ_i and every S_i. Pass 1 here takes the traces t_i (N scalars);
pass 2 accumulates Σ S_i (n × n), Σ ε_i, Σ Δ̄_i·(S_i + ε_i·I) and, in the heterogeneous branch,
Σ Δ_i·S_i and Σ Δ_i (m × n each), since R = Σ Δ_i·S_i − (Σ Δ_i)·(Σ_j (S_j + ε_j·I))/N. The state
grows with the matrix, never with N. A⁻¹ is applied by an LU solve of X·A = B (A is not
symmetric: c is added to every row), not by forming the inverse. Tensors that are not matrices,
and excluded ones, are the mean of w_i·Δ_i, as the official code's 1-D branch."""

from __future__ import annotations

import math
import statistics
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from ..spectral.svd import exact_svd
from .base import MethodSettings, Statistic, Varying
from .spectral import SpectralMethod

# the official code's constants
HETEROGENEITY_THRESHOLD = 0.3  # on γ = var(log t) / mean(log t)²
TINY = 1e-12  # added to traces, log-traces and the mean trace against division by zero


class AceSettings(MethodSettings):
    eps: Varying[Annotated[float, Field(gt=0)]] = 1e-2  # ε, the ridge on each S_i
    k_frac: Varying[Annotated[float, Field(gt=0, le=1)]] = 0.3  # of min(m, n), refinement rank


def heterogeneity(traces: list[float]) -> float:
    """γ = var(log t) / (mean(log t)² + 1e-12), the sample variance as torch.var takes it; with
    one source the variance is undefined (NaN in the official code): γ = 0, homogeneous."""
    if len(traces) < 2:
        return 0.0
    log_traces = [math.log(trace + TINY) for trace in traces]
    return statistics.variance(log_traces) / (statistics.fmean(log_traces) ** 2 + TINY)


class Ace(SpectralMethod):
    name = "ace"
    title = "ACE-Merging (closed-form merge with per-task covariances from the task matrices)"
    paper = ("ACE-Merging, CVPR 2026, arXiv 2603.02945; code unravel-xu/ACE-Merging "
             "(src/merge/strategy.py, ace_merging)")
    Settings = AceSettings
    max_passes = 2
    # Σ S_i (n × n: up to four full-size tensors where n = 4m, an MLP's down projection), the
    # three m × n sums, and at the solve an LU copy of A (n × n again) and its result
    state_tensors = 12
    takes_svds = True
    statistics = (
        Statistic("ace_gamma", "float", "γ", ".3g"),
        Statistic("ace_heterogeneous", "int", "het."),
    )

    def begin_matrix(self, base: Tensor) -> None:
        self.traces: list[float] = []
        self.shape = tuple(base.shape)
        self.like_matrix = base

    def _start_sums(self) -> None:
        """First source of pass 2: the branch is fixed by the traces; the sums start."""
        self.gamma = heterogeneity(self.traces)
        self.heterogeneous = self.gamma > HETEROGENEITY_THRESHOLD
        cols = self.shape[1]
        base = self.like_matrix
        self.covariance_sum = base.new_zeros(cols, cols)  # Σ S_i, without the ridge
        self.ridge_sum = 0.0  # Σ ε_i
        self.target = torch.zeros_like(base)  # Σ Δ̄_i·(S_i + ε_i·I)
        if self.heterogeneous:
            self.residual_sum = torch.zeros_like(base)  # Σ Δ_i·S_i (Δ_i un-centred)
            self.task_sum = torch.zeros_like(base)  # Σ Δ_i
        self.like_matrix = None

    def _scaling(self, centred_trace: float) -> tuple[float, float]:
        """(the factor that makes S_i from C_i, ε_i)."""
        if self.heterogeneous:
            return 1.0 / centred_trace, self.settings.eps / centred_trace
        return 1.0, self.settings.eps

    def update_matrix(self, pass_index: int, source_index: int, weighted: Tensor) -> None:
        if pass_index == 0:
            self.traces.append(float(torch.linalg.vector_norm(weighted)) ** 2)
            return
        if self.like_matrix is not None:
            self._start_sums()
        mean_row = weighted.mean(dim=0, keepdim=True)
        if self.heterogeneous:
            self.task_sum.add_(weighted)
        centred = weighted.sub_(mean_row)  # Δ̄_i, in the engine's buffer
        rows, cols = centred.shape
        if rows >= cols:  # C_i (n × n) serves both sums: Δ̄_i·C_i
            gram = centred.mT @ centred
            centred_trace = float(gram.diagonal().sum()) + TINY
            factor, ridge = self._scaling(centred_trace)
            self.covariance_sum.add_(gram, alpha=factor)
            product = (centred @ gram).mul_(factor)  # Δ̄_i·S_i
        else:  # no temporary larger than m × m: Δ̄_i·C_i = (Δ̄_iΔ̄_iᵀ)·Δ̄_i
            gram = centred @ centred.mT
            centred_trace = float(gram.diagonal().sum()) + TINY
            factor, ridge = self._scaling(centred_trace)
            self.covariance_sum.addmm_(centred.mT, centred, alpha=factor)
            product = (gram @ centred).mul_(factor)
        del gram
        self.ridge_sum += ridge
        self.target.add_(product).add_(centred, alpha=ridge)
        if self.heterogeneous:  # Δ_i·S_i = Δ̄_i·S_i + 1·(mean row)·S_i
            mean_row_times = (mean_row @ centred.mT) @ centred
            self.residual_sum.add_(product).add_(mean_row_times, alpha=factor)

    def update_matrix_factored(self, pass_index: int, source_index: int, left: Tensor,
                               right: Tensor) -> None:
        """A LoRA source Δ = L·Rᵀ (rank r): its mean row is (mean row of L)·Rᵀ, so the centred
        Δ̄ = L̄·Rᵀ stays factored; C = R·(L̄ᵀL̄)·Rᵀ and Δ̄·C = L̄·(RᵀR·L̄ᵀL̄)·Rᵀ go through r × r
        cores, never an m × n product."""
        right_gram = right.mT @ right
        if pass_index == 0:
            self.traces.append(float((left.mT @ left * right_gram).sum()))  # tr(LᵀL·RᵀR)
            return
        if self.like_matrix is not None:
            self._start_sums()
        centred_left = left - left.mean(dim=0, keepdim=True)
        core = centred_left.mT @ centred_left  # L̄ᵀL̄
        centred_trace = float((core * right_gram).sum()) + TINY
        factor, ridge = self._scaling(centred_trace)
        self.covariance_sum.addmm_(right @ core, right.mT, alpha=factor)
        self.ridge_sum += ridge
        product_core = right_gram @ core  # Δ̄·C = L̄·(RᵀR·L̄ᵀL̄)·Rᵀ
        self.target.addmm_(centred_left @ product_core, right.mT, alpha=factor)
        self.target.addmm_(centred_left, right.mT, alpha=ridge)
        if self.heterogeneous:  # Δ·S = L·(RᵀR·L̄ᵀL̄)·Rᵀ / τ
            self.task_sum.addmm_(left, right.mT)
            self.residual_sum.addmm_(left @ product_core, right.mT, alpha=factor)

    def finish_matrix(self) -> Tensor:
        if self.like_matrix is not None:  # no pass 2 ran (no sources)
            self._start_sums()
        count = len(self.traces)
        covariance_sum = self.covariance_sum
        if self.heterogeneous:
            # R without M: Σ Δ_i·S_i − (Σ Δ_i)·(Σ S_j + Σ ε_j·I)/N, before Σ S_j becomes A
            residual = self.residual_sum
            residual.addmm_(self.task_sum, covariance_sum, alpha=-1 / count)
            residual.add_(self.task_sum, alpha=-self.ridge_sum / count)
            self.task_sum = self.residual_sum = None
        # A = Σ S_i + Σ ε_i·I + 1·cᵀ, in place of Σ S_i: the official code takes the mean over
        # dim 0 of the summed covariances (a row) and broadcasts it onto every row
        column_means = covariance_sum.mean(dim=0, keepdim=True)
        if self.heterogeneous:
            column_means.div_(statistics.fmean(self.traces) + TINY)
        system = covariance_sum.add_(column_means)
        system.diagonal().add_(self.ridge_sum)
        self.covariance_sum = None
        merged = torch.linalg.solve(system, self.target, left=False)  # X·A = B
        del system
        self.target = None
        rank = int(min(self.shape) * self.settings.k_frac)
        if self.heterogeneous and rank > 0:  # the flat-spectrum refinement of R
            U, S, V = exact_svd(residual.add_(merged))
            del residual
            merged.addmm_(U[:, :rank], V[:, :rank].mT, alpha=float(S[:rank].mean()))
        self.report.stats = {"ace_gamma": self.gamma,
                             "ace_heterogeneous": int(self.heterogeneous)}
        return merged
