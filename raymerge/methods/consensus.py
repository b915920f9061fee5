"""Combining the sources' (sparsified, weighted) contributions c_i = w_i·s_i·Δ̃_i into M, in one
streaming pass with state independent of N: a plain sum (task arithmetic, DARE, Breadcrumbs,
DELLA-linear) or TIES's sign consensus (TIES, DARE-TIES, Breadcrumbs-TIES, DELLA), each with the
normalizations mergekit 0.1.5 offers (`generalized_task_arithmetic.py`) and the TIES paper's.

Sign consensus: elect s = sign(Σ_i c_i) per entry; the entries agreeing with s are the c_i with
sign(c_i) = s (a zero never agrees); M = Σ agreeing c_i / divisor. The agreeing entries are
exactly the positive ones (s > 0) or the negative ones (s < 0), so the running Σ c_i, the running
sum of its positive entries and the divisor's positive and non-zero parts give the exact result in
one pass: the negative parts follow by difference."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import BeforeValidator
from torch import Tensor

from .sparsify import chunks

LINEAR_DIVISOR_EPSILON = 1e-8  # mergekit: |Σ w_i| below this divides by 1


def _mergekit_normalize(value: object) -> object:
    """mergekit's `normalize: true/false` under sign consensus: divide by the agreeing weights,
    or not at all."""
    if isinstance(value, bool):
        return "weights" if value else "none"
    return value


# What M is divided by under sign consensus: count (TIES paper: the mean of the agreeing
# entries), weights (mergekit normalize: true: Σ w_i over the agreeing sources, 1 where it is 0)
# or none (mergekit normalize: false: their sum).
ConsensusNormalize = Annotated[Literal["count", "weights", "none"],
                               BeforeValidator(_mergekit_normalize)]
# The sign elected where Σ c_i is exactly 0: none (TIES paper, sgn(0) = 0: nothing agrees, M = 0)
# or positive (mergekit: Σ ≥ 0 elects +, so the positive entries are kept).
ZeroSumSign = Literal["none", "positive"]


def linear_normalized(merged: Tensor, weights: list[float]) -> Tensor:
    """mergekit's `normalize: true` without consensus: M / Σ w_i (1 where |Σ w_i| < 1e-8)."""
    total = sum(weights)
    return merged.div_(total if abs(total) >= LINEAR_DIVISOR_EPSILON else 1.0)


def _trim_and_scale(piece: Tensor, keep_threshold: float | None, scale: float) -> None:
    if keep_threshold is not None:
        piece.mul_(piece.abs() >= keep_threshold)
    if scale != 1.0:
        piece.mul_(scale)


class SignConsensus:
    """The running state of a sign-consensus merge of one tensor."""

    def __init__(self, like: Tensor, normalize: str, zero_sum_sign: str,
                 weights: list[float]) -> None:
        self.normalize = normalize
        self.zero_sum_sign = zero_sum_sign
        self.total = torch.zeros_like(like)  # Σ c_i
        self.positive_sum = torch.zeros_like(like)  # Σ max(c_i, 0)
        # The divisor's positive part and its total over the non-zero c_i: counts (int16,
        # N < 32768) for `count`, and for `weights` with one weight shared by every source (the
        # weighted count is then w·count); running Σ w_i otherwise.
        self.equal_weights = len(set(weights)) == 1
        self.shared_weight = weights[0] if weights else 1.0
        if normalize == "none":
            self.positive_divisor = self.nonzero_divisor = None
        else:
            dtype = torch.int16 if normalize == "count" or self.equal_weights else like.dtype
            self.positive_divisor = torch.zeros_like(like, dtype=dtype)
            self.nonzero_divisor = torch.zeros_like(like, dtype=dtype)

    def add(self, contribution: Tensor, weight: float, keep_threshold: float | None = None,
            scale: float = 1.0) -> None:
        """One source's c_i (its weight w_i is already in it, or `scale` puts it there;
        `weight` feeds the divisor). With `keep_threshold`, entries below it in magnitude are
        dropped first (the TIES trim, applied a piece at a time while it is in the cache: the
        same operations, in the same order, as trimming and scaling the whole tensor first)."""
        counted = self.positive_divisor is not None and self.positive_divisor.dtype == torch.int16
        if self.positive_divisor is None:
            for piece, total, positive in chunks(contribution, self.total, self.positive_sum):
                _trim_and_scale(piece, keep_threshold, scale)
                total.add_(piece)
                positive.add_(piece.clamp(min=0))
            return
        for piece, total, positive, positive_divisor, nonzero_divisor in chunks(
                contribution, self.total, self.positive_sum, self.positive_divisor,
                self.nonzero_divisor):
            _trim_and_scale(piece, keep_threshold, scale)
            total.add_(piece)
            positive.add_(piece.clamp(min=0))
            if counted:
                positive_divisor.add_(piece > 0)
                nonzero_divisor.add_(piece != 0)
            else:
                positive_divisor.add_(piece > 0, alpha=weight)
                nonzero_divisor.add_(piece != 0, alpha=weight)

    def result(self) -> Tensor:
        """M, written into the running sum's storage (the state is released)."""
        has_divisor = self.positive_divisor is not None
        state = [self.total, self.positive_sum] + (
            [self.positive_divisor, self.nonzero_divisor] if has_divisor else [])
        for total, positive, *divisors in chunks(*state):
            negative = total - positive
            if self.zero_sum_sign == "positive":
                elect_positive, elect_negative = total >= 0, total < 0
            else:
                elect_positive, elect_negative = total > 0, total < 0
            agreeing = torch.where(elect_positive, positive,
                                   torch.where(elect_negative, negative, 0.0))
            if has_divisor:
                positive_divisor, nonzero_divisor = divisors
                divisor = torch.where(elect_positive, positive_divisor,
                                      nonzero_divisor - positive_divisor).to(total.dtype)
                if self.normalize == "weights" and self.equal_weights:
                    divisor.mul_(self.shared_weight)
                # count: no agreeing entry means a zero sum (0/1); weights: mergekit's divisor 0
                # -> 1 (also where agreeing weights cancel)
                agreeing.div_(torch.where(divisor == 0, 1.0, divisor))
            total.copy_(agreeing)
        merged = self.total
        self.total = self.positive_sum = self.positive_divisor = self.nonzero_divisor = None
        return merged
