"""WUDI-Merging (arXiv 2503.08099; code nathanielyvo/WUDI-Merging, vit/wudi_main.py), streamed.

Per matrix, starting from M = Σ_i Δ_i, Adam (lr 1e-5, default betas and ε, 300 steps) on

    L(M) = Σ_i ‖(M − Δ_i)·Δ_iᵀ‖²_F / ‖Δ_i‖²_F                      (the paper's Eq. 9)

The official code holds all N task vectors and back-propagates through that sum every step.
Its gradient is a sum over sources of terms linear in M,

    ∇L = 2·(M·G − B),   G = Σ_i Δ_iᵀΔ_i / ‖Δ_i‖²  (n × n),   B = Σ_i Δ_i·Δ_iᵀΔ_i / ‖Δ_i‖²  (m × n),

so one streaming pass accumulates G, B and Σ_i Δ_i and the whole optimisation runs on them: the
state grows with the matrix's width n, never with N. The loss itself is
L(M) = ⟨M, M·G − 2B⟩ + c with c = Σ_i ‖Δ_iᵀΔ_i‖²_F / ‖Δ_i‖² (one more scalar), reported before
and after the optimisation. Sources are the weighted deltas w_i·Δ_i (the official code has no
weights); tensors that are not matrices, and excluded ones, are the mean of w_i·Δ_i, as
FusionBench's port of WUDI does (the official ViT code leaves them at the base)."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from .base import MethodSettings, Statistic, Varying
from .spectral import SpectralMethod

# torch.optim.Adam's defaults, which the official code uses (weight_decay 0, no AMSGrad)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class WudiSettings(MethodSettings):
    # Adam steps per matrix (a gradient over the layers is rounded to whole steps)
    iter_num: Varying[Annotated[int, Field(ge=0)]] = 300
    lr: Varying[Annotated[float, Field(gt=0)]] = 1e-5  # Adam's learning rate

    @classmethod
    def svc_auto_alpha(cls, num_sources: int) -> tuple[float, str]:
        return 1.0, ("1.0 after WUDI (the SVC authors' FusionBench config "
                     "singular_value_calibration/wudi.yaml)")


def adam_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int,
              lr: float) -> None:
    """One step of torch.optim.Adam as PyTorch writes it (Kingma & Ba 2015, Algorithm 1, with
    ε added to the bias-corrected √v̂), in place. `grad` is overwritten (reused as the
    denominator, which saves one full-size buffer)."""
    beta1, beta2 = ADAM_BETAS
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denominator = torch.sqrt(exp_avg_sq, out=grad)
    denominator.div_(math.sqrt(1 - beta2**step)).add_(ADAM_EPS)
    param.addcdiv_(exp_avg, denominator, value=-lr / (1 - beta1**step))


class Wudi(SpectralMethod):
    name = "wudi"
    title = "WUDI-Merging (task vectors as the guide to interference, Adam on their sum)"
    paper = ("Whoever Started the Interference Should End It: Guiding Data-Free Model Merging "
             "via Task Vectors, arXiv 2503.08099; code nathanielyvo/WUDI-Merging")
    Settings = WudiSettings
    # M, Adam's two moments, B and one work buffer (m × n each), and G (n × n): up to four
    # more full-size tensors where n = 4m (an MLP's down projection)
    state_tensors = 9
    statistics = (
        Statistic("wudi_loss_before", "float", "loss₀", ".3g"),
        Statistic("wudi_loss_after", "float", "loss", ".3g"),
    )

    def begin_matrix(self, base: Tensor) -> None:
        rows, cols = base.shape
        self.task_sum = torch.zeros_like(base)
        self.input_gram = base.new_zeros(cols, cols)  # G
        self.target = torch.zeros_like(base)  # B
        self.constant = 0.0  # c, in float64

    def update_matrix(self, pass_index: int, source_index: int, weighted: Tensor) -> None:
        self.task_sum.add_(weighted)
        norm_sq = float(torch.linalg.vector_norm(weighted)) ** 2  # no m × n temporary
        if norm_sq == 0.0:  # Δ_i = 0: its term is 0 (the official code would divide 0 by 0)
            return
        rows, cols = weighted.shape
        if rows > cols:  # ΔᵀΔ (n × n) serves G and B: B_i = Δ·(ΔᵀΔ)
            gram = weighted.mT @ weighted
            self.input_gram.add_(gram, alpha=1 / norm_sq)
            self.target.addmm_(weighted, gram, alpha=1 / norm_sq)
        else:  # no temporary larger than m × m: B_i = (ΔΔᵀ)·Δ
            self.input_gram.addmm_(weighted.mT, weighted, alpha=1 / norm_sq)
            gram = weighted @ weighted.mT
            self.target.addmm_(gram, weighted, alpha=1 / norm_sq)
        # ‖ΔᵀΔ‖²_F = ‖ΔΔᵀ‖²_F = Σσ⁴
        self.constant += float(gram.square().sum(dtype=torch.float64)) / norm_sq

    def update_matrix_factored(self, pass_index: int, source_index: int, left: Tensor,
                               right: Tensor) -> None:
        """A LoRA source Δ = L·Rᵀ (rank r): ΔᵀΔ = R·(LᵀL)·Rᵀ and Δ·ΔᵀΔ = L·(RᵀR·LᵀL)·Rᵀ, through
        r × r cores, never an m × n product."""
        self.task_sum.addmm_(left, right.mT)
        left_gram, right_gram = left.mT @ left, right.mT @ right
        norm_sq = float((left_gram * right_gram).sum())  # tr(LᵀL·RᵀR)
        if norm_sq == 0.0:
            return
        self.input_gram.addmm_(right @ left_gram, right.mT, alpha=1 / norm_sq)
        self.target.addmm_(left @ (right_gram @ left_gram), right.mT, alpha=1 / norm_sq)
        core = left_gram @ right_gram  # tr((ΔᵀΔ)²) = tr((LᵀL·RᵀR)²)
        self.constant += float((core * core.mT).sum(dtype=torch.float64)) / norm_sq

    def finish_matrix(self) -> Tensor:
        merged, self.task_sum = self.task_sum, None  # M starts from the sum of task vectors
        work = torch.empty_like(merged)
        loss_before = self._loss(merged, work)
        exp_avg, exp_avg_sq = torch.zeros_like(merged), torch.zeros_like(merged)
        lr, steps = self.settings.lr, round(self.settings.iter_num)
        for step in range(1, steps + 1):
            torch.addmm(self.target, merged, self.input_gram, beta=-2, alpha=2, out=work)
            adam_step(merged, work, exp_avg, exp_avg_sq, step, lr)
        del exp_avg, exp_avg_sq
        loss_after = self._loss(merged, work) if steps else loss_before
        self.input_gram = self.target = None
        self.report.stats = {"wudi_loss_before": loss_before, "wudi_loss_after": loss_after}
        return merged

    def _loss(self, merged: Tensor, work: Tensor) -> float:
        """L(M) = ⟨M, M·G − 2B⟩ + c (into `work`)."""
        torch.addmm(self.target, merged, self.input_gram, beta=-2, out=work)
        return dot_float64(merged, work) + self.constant


def dot_float64(left: Tensor, right: Tensor, rows_at_once: int = 256) -> float:
    """⟨left, right⟩ summed in float64 a block of rows at a time (small temporaries): the loss
    is a difference of terms far larger than itself once the optimisation has converged."""
    total = 0.0
    for start in range(0, left.shape[0], rows_at_once):
        block = slice(start, start + rows_at_once)
        total += float(torch.sum(left[block].double() * right[block].double()))
    return total
