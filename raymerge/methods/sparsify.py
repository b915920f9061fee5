"""Sparsification of one source's delta, as mergekit 0.1.5 defines it (`mergekit/sparsify.py`),
done in place on the one delta in memory: top-k by magnitude (TIES), top-k without the largest
outliers (Model Breadcrumbs), random drops (DARE) and rank-based random drops (DELLA's MAGPRUNE),
and the rescaling of the survivors that may follow.

Deterministic masks keep every entry at or above the k-th largest |value| (an order statistic,
no sort): the same set as mergekit's argsort top-k except where magnitudes tie at the threshold,
where mergekit keeps an arbitrary subset and raymerge keeps them all. Random masks are drawn on
the CPU from a stream seeded by (seed, tensor name, source index), so reruns, any unit order and
any worker give the same bytes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BeforeValidator, Field
from torch import Tensor

CHUNK = 1 << 18  # elements per step of the elementwise work: temporaries stay in cache
L1_EPSILON = 1e-7  # mergekit's rescaled_masked_tensor: below this L1 norm, no rescaling

Density = Annotated[float, Field(ge=0.0, le=1.0)]  # fraction of a source's entries kept
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


def _mergekit_rescale(value: object) -> object:
    """mergekit's `rescale: true/false` is its L1 rescaling (or none)."""
    if isinstance(value, bool):
        return "l1" if value else "none"
    return value


# How a source's survivors are rescaled: none; l1 (mergekit: match the L1 norm the source had
# before sparsification); inverse (DARE and DELLA papers: divide each survivor by its keep
# probability). A YAML boolean means mergekit's: true = l1, false = none.
Rescale = Annotated[Literal["none", "l1", "inverse"], BeforeValidator(_mergekit_rescale)]
DeterministicRescale = Annotated[Literal["none", "l1"], BeforeValidator(_mergekit_rescale)]


def chunks(*tensors: Tensor) -> Iterator[list[Tensor]]:
    """Matching flat pieces of same-shaped tensors, CHUNK elements at a time on the CPU (the
    temporaries stay in cache); whole on a GPU (one kernel launch per operation, not ~400)."""
    flat = [tensor.view(-1) for tensor in tensors]
    step = CHUNK if flat[0].device.type == "cpu" else max(1, flat[0].numel())
    for start in range(0, flat[0].numel(), step):
        yield [piece[start:start + step] for piece in flat]


_SAME_WIDTH_INTEGERS = {torch.float64: torch.int64, torch.float32: torch.int32,
                        torch.float16: torch.int16, torch.bfloat16: torch.int16}


def radix_select(magnitudes: Tensor, position: int) -> float:
    """The value at 0-based `position` of the ascending order of non-negative floats, exactly
    (ties included: it is one of the values). Non-negative IEEE floats order as their bit
    patterns read as integers, so a radix select on those finds it: 16 bits a pass from the
    top, a histogram of each pass's digit among the candidates left (bincount), no sort. On a
    GPU this is a few bandwidth-bound passes where torch.kthvalue runs in one thread block."""
    bits = magnitudes.contiguous().view(_SAME_WIDTH_INTEGERS[magnitudes.dtype]).flatten()
    candidates = bits
    for shift in range(bits.element_size() * 8 - 16, -1, -16):
        digit = (candidates >> shift) & 0xFFFF
        if digit.dtype != torch.int64 and digit.dtype != torch.int32:
            digit = digit.to(torch.int32)
        cumulative = torch.bincount(digit, minlength=1 << 16).cumsum(0)
        bucket = int(torch.searchsorted(cumulative, position, right=True))
        position -= int(cumulative[bucket - 1]) if bucket else 0
        candidates = candidates[digit == bucket]
    return float(candidates[:1].view(magnitudes.dtype)[0])


def magnitude_order_statistics(values: Tensor, positions: Sequence[int],
                               scratch: Tensor | None = None) -> list[float]:
    """The |value|s at these 0-based positions of the ascending order (exact, no sort).
    `scratch` (same shape and dtype) avoids a fresh allocation."""
    magnitudes = (torch.abs(values, out=scratch) if scratch is not None else values.abs()).flatten()
    if magnitudes.device.type == "cpu":
        # numpy's introselect is exact and ~15x faster than torch.kthvalue on the CPU; it
        # partitions the temporary magnitudes in place, so no second copy is made.
        as_numpy = magnitudes.numpy()
        as_numpy.partition(sorted(set(positions)))
        return [float(as_numpy[position]) for position in positions]
    return [radix_select(magnitudes, position) for position in positions]


def magnitude_threshold(values: Tensor, density: float, scratch: Tensor | None = None) -> Tensor:
    """The k-th largest |value| with k = max(1, int(density·numel)): entries at or above it are
    kept (mergekit's top-k count)."""
    keep_count = max(1, int(density * values.numel()))
    (threshold,) = magnitude_order_statistics(values, [values.numel() - keep_count], scratch)
    return torch.tensor(threshold, dtype=values.dtype)


def keep_largest(values: Tensor, density: float, scratch: Tensor | None = None) -> None:
    """mergekit `magnitude` (TIES trim), in place: keep the k = max(1, int(density·n)) entries
    largest in magnitude; density 1 keeps all, density 0 none."""
    if density >= 1.0:
        return
    if density <= 0.0 or values.numel() == 0:
        values.zero_()
        return
    threshold = magnitude_threshold(values, density, scratch).item()
    for (piece,) in chunks(values):
        piece.mul_(piece.abs() >= threshold)


def keep_between_outliers(values: Tensor, density: float, gamma: float,
                          scratch: Tensor | None = None) -> None:
    """mergekit `magnitude_outliers` (Model Breadcrumbs, arXiv 2312.06795), in place: with
    n entries, drop the int(gamma·n) largest in magnitude and keep the next int(density·n);
    where the two do not fit in n, fewer outliers are dropped. Density 1 keeps all."""
    if density >= 1.0:
        return
    count = values.numel()
    keep_count = int(density * count)
    outlier_count = int(gamma * count)
    below = max(0, count - keep_count - outlier_count)  # entries dropped as too small
    if keep_count == 0:
        values.zero_()
        return
    low, high = magnitude_order_statistics(values, [below, below + keep_count - 1], scratch)
    for (piece,) in chunks(values):
        magnitude = piece.abs()
        piece.mul_((magnitude >= low) & (magnitude <= high))


def source_generator(seed: int, name: str, source_index: int) -> torch.Generator:
    """The random stream of one (seed, tensor, source): independent of every other."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{source_index}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def random_keep_mask(shape: torch.Size, drop_probability: float,
                     generator: torch.Generator) -> Tensor:
    """DARE's mask: True where an entry survives (probability 1 − p). Drawn on the CPU so every
    device gets the same mask."""
    return torch.rand(shape, generator=generator) >= drop_probability


def keep_random(values: Tensor, density: float, generator: torch.Generator) -> None:
    """mergekit `bernoulli` (DARE), in place: each entry kept with probability `density`; the
    mask is DARE's with p = 1 − density (the same draws as `dare` with that p and seed)."""
    if density >= 1.0:
        return
    values.mul_(random_keep_mask(values.shape, 1.0 - density, generator).to(values.device))


def keep_magprune(values: Tensor, density: float, epsilon: float, generator: torch.Generator,
                  inverse_rescale: bool) -> None:
    """mergekit `della_magprune` (DELLA, arXiv 2406.11617), in place. Along dim 1 (a 1-D tensor
    is one row), rank each row's entries by magnitude, r = 0 the smallest … L − 1 the largest;
    keep an entry with probability p = density − ε + 2ε·r/(L − 1) (a row of one entry: p =
    density); `inverse_rescale` divides each survivor by its p (DELLA eq. 3).
    Density 1 keeps all, density 0 none."""
    if density >= 1.0:
        return
    if density <= 0.0:
        values.zero_()
        return
    uniform = torch.rand(values.shape, generator=generator).to(values.device)
    moved = None
    if values.dim() < 2:
        rows, draws = values.view(1, -1), uniform.view(1, -1)
    elif values.dim() == 2:
        rows, draws = values, uniform
    else:  # rank along dim 1, as mergekit: move it last, work on a copy, move it back
        moved = values.movedim(1, -1).contiguous()
        rows = moved.view(-1, moved.shape[-1])
        draws = uniform.movedim(1, -1).reshape(rows.shape)
    length = rows.shape[-1]
    step = max(1, CHUNK // length)
    for start in range(0, rows.shape[0], step):
        block, block_draws = rows[start:start + step], draws[start:start + step]
        if length > 1:
            probability = row_ranks(block).to(torch.float64).mul_(
                2 * epsilon / (length - 1)).add_(density - epsilon)
        else:
            probability = torch.full(block.shape, density, dtype=torch.float64,
                                     device=block.device)
        kept = block * (block_draws < probability)
        block.copy_(kept.div_(probability) if inverse_rescale else kept)
    if moved is not None:
        values.copy_(moved.movedim(-1, 1))


def row_ranks(rows: Tensor) -> Tensor:
    """Each entry's 0-based rank by magnitude within its row (int64), equal magnitudes ranked
    by position: a total order, so every machine draws the same mask."""
    length = rows.shape[-1]
    if rows.device.type == "cpu" and rows.dtype == torch.float32:
        # A non-negative float32 orders as its bit pattern; with the column in the low 32 bits
        # every key is distinct, and numpy's (unstable, vectorised) sort of int64 keys is ~3x
        # faster than a stable argsort.
        magnitudes = rows.abs().numpy().view(np.int32)
        keys = (magnitudes.astype(np.int64) << 32) | np.arange(length, dtype=np.int64)
        keys.sort(axis=-1)
        order = torch.from_numpy(keys & 0xFFFFFFFF)
    else:
        order = rows.abs().argsort(dim=-1, stable=True)
    positions = torch.arange(length, device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def l1_rescale_factor(before: float, after: float) -> float:
    """mergekit's rescaled_masked_tensor with the L1 norm: ‖Δ‖₁ / ‖masked Δ‖₁, or 1 where
    either norm is below 1e-7."""
    if before < L1_EPSILON or after < L1_EPSILON:
        return 1.0
    return before / after


def l1_norm(values: Tensor) -> float:
    return float(torch.linalg.vector_norm(values, ord=1))
