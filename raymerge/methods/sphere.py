"""Angles between tensors and spherical interpolation, as mergekit's slerp and nuslerp define
them, shared by the geometric methods (slerp, nuslerp).

A "vector" is the whole tensor, or each row (its last dimension), or each column (its first
dimension); the scalars of every vector (dot products, norms, angles) are kept with the vector
dimensions of size 1, so that they broadcast over the tensor.

Accuracy: a fine-tune W = B + Δ is nearly parallel to its base B (angles of 1e-3 rad and less),
where θ = acos(cos θ) in float32 loses most of its digits (cos θ = 1 − θ²/2 is rounded to 6e-8).
So θ is atan2(sin θ, cos θ) from dot products summed in float64, with
|v|²|w|²·sin²θ = |B|²|Δ|² − (B·Δ)² for v = B, w = B + Δ (Lagrange's identity, written without
the cancellation of |B|⁴); and the merged delta is formed as c_B·B + c_Δ·Δ with coefficients
free of cancellation, instead of slerp(B, W) − B.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

VectorLayout = Literal["whole", "rows", "columns"]


def vector_dims(tensor: Tensor, layout: VectorLayout) -> tuple[int, ...]:
    """The dimensions one vector spans: all of them, the last (rows) or the first (columns)."""
    if layout == "whole" or tensor.dim() <= 1:
        return tuple(range(tensor.dim()))
    return (tensor.dim() - 1,) if layout == "rows" else (0,)


CHUNK = 1 << 20  # elements per step of a whole-tensor dot product: small temporaries


def dot(x: Tensor, y: Tensor) -> float:
    """x·y over whole tensors: products in the tensors' dtype, summed in float64 a chunk at a
    time (a float32 sum of millions of terms would lose digits that the angles between nearly
    parallel tensors need; float64 products would cost twice the time for nothing: each product
    is rounded once, and those errors average out)."""
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, flat_x.numel(), CHUNK):
        piece = slice(start, start + CHUNK)
        total += torch.sum(flat_x[piece] * flat_y[piece], dtype=torch.float64)
    return float(total)


def norm(x: Tensor) -> float:
    return dot(x, x) ** 0.5


def inner(x: Tensor, y: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Per-vector dot products x·y in float64, with the vector dimensions kept (size 1)."""
    if len(dims) == x.dim():  # the whole tensor is one vector
        return torch.tensor(dot(x, y), dtype=torch.float64, device=x.device).reshape(
            (1,) * x.dim())
    return torch.sum(x * y, dim=dims, keepdim=True, dtype=torch.float64)


def angle(first_sq: Tensor, dot_product: Tensor, second_sq: Tensor, cross_sq: Tensor,
          floor_norm: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """(cos θ, θ) between the vectors v, w of each pair from |v|², v·w, |w|² and
    cross_sq = |v|²|w|² − (v·w)² (given in a form without cancellation where one exists).

    cos θ is mergekit's: v·w / (floor(|v|)·floor(|w|)), clamped to [−1, 1], where `floor` is the
    method's guard for tiny norms. Where both norms are above the guard, θ = atan2(√cross_sq, v·w):
    accurate for nearly parallel vectors, and exactly 0 or π for a vector and its negation or
    double (where acos of a rounded cos θ may land on either side of mergekit's colinearity
    test); elsewhere it is mergekit's acos(cos θ)."""
    first_norm, second_norm = first_sq.sqrt(), second_sq.sqrt()
    floored_first, floored_second = floor_norm(first_norm), floor_norm(second_norm)
    cosine = (dot_product / (floored_first * floored_second)).clamp(-1.0, 1.0)
    exact = (floored_first == first_norm) & (floored_second == second_norm) & (first_sq > 0) \
        & (second_sq > 0)
    theta = torch.where(exact, torch.atan2(cross_sq.clamp(min=0.0).sqrt(), dot_product),
                        torch.acos(cosine))
    return cosine, theta


def pair_angle(first: Tensor, second: Tensor, dims: tuple[int, ...],
               floor_norm: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """(cos θ, θ) between each vector of `first` and of `second`."""
    first_sq, second_sq = inner(first, first, dims), inner(second, second, dims)
    dot_product = inner(first, second, dims)
    return angle(first_sq, dot_product, second_sq, first_sq * second_sq - dot_product.square(),
                 floor_norm)


def offset_angle(base: Tensor, delta: Tensor, dims: tuple[int, ...],
                 floor_norm: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """(cos θ, θ) between each vector of B and of B + Δ, without forming B + Δ: from |B|², B·Δ,
    |Δ|², with |B|²|B + Δ|² − (B·(B + Δ))² = |B|²|Δ|² − (B·Δ)² (no cancellation of |B|⁴)."""
    base_sq, base_dot_delta = inner(base, base, dims), inner(base, delta, dims)
    delta_sq = inner(delta, delta, dims)
    target_sq = (base_sq + 2 * base_dot_delta + delta_sq).clamp(min=0.0)  # |B + Δ|²
    return angle(base_sq, base_sq + base_dot_delta, target_sq,
                 base_sq * delta_sq - base_dot_delta.square(), floor_norm)


def slerp_coefficients(t: float, theta: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) with slerp(v0, v1) = a·v0 + b·v1: a = sin((1−t)θ)/sin θ, b = sin(tθ)/sin θ
    (Shoemake's formula, which mergekit applies to the unnormalised vectors)."""
    sin_theta = torch.sin(theta)
    return torch.sin((1 - t) * theta) / sin_theta, torch.sin(t * theta) / sin_theta


def offset_slerp_coefficients(t: float, theta: Tensor) -> tuple[Tensor, Tensor]:
    """(c_B, c_Δ) with slerp(B, B + Δ) − B = c_B·B + c_Δ·Δ, i.e. c_B = a + b − 1 and c_Δ = b.
    a + b − 1 = 2·sin((1−t)θ/2)·sin(tθ/2)/cos(θ/2) (sum-to-product), which has no cancellation
    when θ is small; valid for 0 < θ < π, where the spherical branch is taken."""
    half = theta / 2
    base_coefficient = 2 * torch.sin((1 - t) * half) * torch.sin(t * half) / torch.cos(half)
    return base_coefficient, torch.sin(t * theta) / torch.sin(theta)
