"""SCE: Select, Calculate, Erase (FuseChat, arXiv 2408.07990), as mergekit 0.1.5's `sce`.

With task vectors τ_i = Δ_i (SCE weighs the sources itself: as in mergekit, a source weight is
refused):
  Select:    where `select_topk` < 1, keep the k = int(select_topk · #{var > 0}) entries with the
             largest variance across the sources, var = (1/N)·Σ_i (τ_i − mean τ)², zero the rest.
  Calculate: s_i = mean over entries of τ_i² (after selection); ŝ_i = s_i / Σ_j s_j, or 1/N where
             |Σ_j s_j| < 1e-6 (mergekit's fallback; it applies to most LLM deltas, whose mean
             squares are ~1e-8).
  Erase:     elect the sign by Σ_i τ_i ≥ 0 → +, else −; an entry agrees where sign(τ_i) equals it.
  M = Σ_i ŝ_i·τ_i·[agrees] / max(Σ_i ŝ_i·[agrees], 1e-6).

Streamed in passes, each holding a fixed number of tensors whatever N: a selection pass (running
mean and sum of squared deviations, Welford's update: stable in float32) when select_topk < 1,
then a pass for the s_i and Σ τ_i, then the erase-and-merge pass."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from .base import Method, MethodSettings, Varying
from .sparsify import chunks, magnitude_order_statistics

UNIFORM_FALLBACK = 1e-6  # mergekit sce_weight: Σ s_i below this gives every source 1/N
DIVISOR_FLOOR = 1e-6  # mergekit: the agreeing weights' sum is clamped to at least this

SELECT, CALCULATE, ERASE = range(3)


class SceSettings(MethodSettings):
    # fraction of the entries (of those that vary across sources) kept by variance; 1: all
    select_topk: Varying[Annotated[float, Field(ge=0.0, le=1.0)]] = 1.0
    takes_weights = False


class Sce(Method):
    name = "sce"
    title = "SCE (select, calculate, erase)"
    paper = "FuseChat: Knowledge Fusion of Chat Models (SCE merging), arXiv 2408.07990"
    Settings = SceSettings
    max_passes = 3
    state_tensors = 3  # two running tensors per pass, the selection and elected-sign masks

    def begin(self, name: str, base: Tensor) -> None:
        topk = self.settings.select_topk
        self.selecting = topk < 1.0
        # select_topk 0 selects nothing: M = 0 without reading any source
        self.passes = 0 if topk <= 0.0 else (3 if self.selecting else 2)
        self.like = base
        self.phase: int | None = None
        self.selected: Tensor | None = None
        self.mean = self.squared_deviations = None
        self.tau_sum = self.elect_positive = None
        self.numerator = self.denominator = None
        self.mean_squares: list[float] = []

    def update(self, pass_index: int, source_index: int, delta: Tensor) -> None:
        phase = pass_index if self.selecting else pass_index + 1
        if phase != self.phase:
            self._start(phase)
        tau = delta
        if phase == SELECT:
            self._accumulate_variance(source_index + 1, tau)
            return
        if self.selected is not None:
            tau.mul_(self.selected)
        if phase == CALCULATE:
            self.mean_squares.append(
                float(torch.linalg.vector_norm(tau)) ** 2 / max(1, tau.numel()))
            self.tau_sum.add_(tau)
            return
        share = self.shares[source_index]
        for piece, elect_positive, numerator, denominator in chunks(
                tau, self.elect_positive, self.numerator, self.denominator):
            agrees = torch.where(elect_positive, piece > 0, piece < 0)
            numerator.add_(piece * agrees, alpha=share)
            denominator.add_(agrees, alpha=share)

    def _start(self, phase: int) -> None:
        """Set up a pass's state from the previous pass's, which is then released."""
        self.phase = phase
        if phase == SELECT:
            self.mean = torch.zeros_like(self.like)
            self.squared_deviations = torch.zeros_like(self.like)
        elif phase == CALCULATE:
            if self.selecting:
                self.selected = self._select()
            self.tau_sum = torch.zeros_like(self.like)
        else:
            self.elect_positive = self.tau_sum >= 0
            self.tau_sum = None
            total = sum(self.mean_squares)
            self.shares = ([1.0 / self.num_sources] * self.num_sources
                           if abs(total) < UNIFORM_FALLBACK
                           else [value / total for value in self.mean_squares])
            self.numerator = torch.zeros_like(self.like)
            self.denominator = torch.zeros_like(self.like)

    def _accumulate_variance(self, count: int, tau: Tensor) -> None:
        """Welford: mean += (x − mean)/count; M2 += (x − mean_before)·(x − mean_after)."""
        for piece, mean, squared_deviations in chunks(tau, self.mean, self.squared_deviations):
            step = piece - mean
            mean.add_(step, alpha=1.0 / count)
            squared_deviations.add_(step.mul_(piece - mean))

    def _select(self) -> Tensor:
        """The entries of the k largest variances (N·var = M2 ranks them alike); where the
        variance ties at the threshold every tied entry is kept."""
        variation = self.squared_deviations
        keep_count = int(int(torch.count_nonzero(variation)) * self.settings.select_topk)
        if keep_count == 0:
            selected = torch.zeros_like(variation, dtype=torch.bool)
        else:
            (threshold,) = magnitude_order_statistics(
                variation, [variation.numel() - keep_count], scratch=self.mean)
            selected = variation >= threshold
        self.mean = self.squared_deviations = None
        return selected

    def finish(self) -> Tensor:
        if self.passes == 0:
            return torch.zeros_like(self.like)
        merged = self.numerator.div_(self.denominator.clamp_(min=DIVISOR_FLOOR))
        self.numerator = self.denominator = self.elect_positive = self.selected = None
        self.like = None
        return merged
