"""Dense float64 references for mergekit 0.1.5's generalized task arithmetic family and SCE,
written from its formulas (every source's delta held at once, masks by full sorts as mergekit
draws them). Random masks use raymerge's per-(seed, tensor, source) streams, so the streaming
code must match these bit for bit in its choice of survivors."""

from __future__ import annotations

import torch

from raymerge.methods.sparsify import source_generator


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the max(1, int(density·n)) largest |entries| (argsort order)."""
    if density >= 1:
        return delta.clone()
    if density <= 0:
        return torch.zeros_like(delta)
    keep = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[torch.argsort(delta.abs().flatten(), descending=True)[:keep]] = True
    return torch.where(mask.view_as(delta), delta, 0.0)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Ascending order; skip the smallest n − int(density·n) − int(gamma·n) (at least 0) and
    keep the next int(density·n)."""
    if density >= 1:
        return delta.clone()
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.argsort(delta.abs().flatten())[bottom:bottom + target]] = True
    return torch.where(mask.view_as(delta), delta, 0.0)


def random_drop(delta: torch.Tensor, density: float, seed: int, name: str, index: int
                ) -> torch.Tensor:
    """Bernoulli(density) survivors from the source's stream (DARE's draw with p = 1 − d)."""
    if density >= 1:
        return delta.clone()
    uniform = torch.rand(delta.shape, generator=source_generator(seed, name, index))
    return torch.where(uniform >= 1.0 - density, delta, 0.0)


def magprune(delta: torch.Tensor, density: float, epsilon: float, seed: int, name: str,
             index: int, inverse: bool = False) -> torch.Tensor:
    """DELLA: rank |entries| along dim 1 (1-D: one row), p = density − ε + 2ε·rank_norm with
    rank_norm = (rank − min)/(max − min); keep where the source's uniform draw is below p."""
    if density >= 1:
        return delta.clone()
    if density <= 0:
        return torch.zeros_like(delta)
    uniform = torch.rand(delta.shape, generator=source_generator(seed, name, index)).double()
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    draws = uniform.reshape(1, -1) if delta.dim() < 2 else uniform
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).double() + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    probability = (density - epsilon) + rank_norm * 2 * epsilon
    kept = torch.where(draws < probability, rows, 0.0)
    if inverse:
        kept = kept / probability
    return kept.reshape(delta.shape)


def l1_rescaled(delta: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def combine(sparsified: list[torch.Tensor], weights: list[float], consensus: bool,
            normalize: bool | str, zero_sum_sign: str = "positive") -> torch.Tensor:
    """mergekit's merge_group after sparsification: weight, (sign consensus), normalize.
    `normalize` under consensus: True/'weights', False/'none' or 'count' (TIES paper)."""
    deltas = torch.stack(sparsified)
    w = torch.tensor(weights, dtype=deltas.dtype).view(-1, *[1] * (deltas.dim() - 1))
    deltas = deltas * w
    if not consensus:
        mixed = deltas.sum(0)
        divisor = w.sum()
        divisor = divisor if divisor.abs() >= 1e-8 else torch.tensor(1.0, dtype=deltas.dtype)
        return mixed / divisor if normalize else mixed
    total = deltas.sum(0)
    if zero_sum_sign == "positive":
        majority = torch.where(total >= 0, 1.0, -1.0)
    else:
        majority = torch.sign(total)
    mask = (torch.sign(deltas) == majority) & (deltas != 0)
    mixed = torch.where(mask, deltas, 0.0).sum(0)
    if normalize in (False, "none"):
        return mixed
    if normalize == "count":
        divisor = mask.sum(0).double()
    else:
        divisor = (w * mask).sum(0)
    divisor = torch.where(divisor == 0, 1.0, divisor)
    return mixed / divisor


def gta(method: str, deltas: torch.Tensor, weights: list[float], name: str = "",
        density: float | list[float] = 1.0, gamma: float | list[float] = 0.01,
        epsilon: float | list[float] = 0.15, seed: int = 0, rescale: str = "none",
        normalize: bool | str = False, zero_sum_sign: str = "positive") -> torch.Tensor:
    """M of one mergekit generalized-task-arithmetic method; per-source values as lists."""
    n = len(weights)

    def each(value):
        return value if isinstance(value, list) else [value] * n

    densities, gammas, epsilons = each(density), each(gamma), each(epsilon)
    sparse = []
    for index, delta in enumerate(deltas):
        d = densities[index]
        if method in ("task_arithmetic",):
            kept = delta.clone()
        elif method in ("ties",):
            kept = magnitude(delta, d)
        elif method in ("dare_ties", "dare_linear"):
            kept = random_drop(delta, d, seed, name, index)
            if rescale == "inverse" and d < 1:
                kept = kept / d
        elif method in ("breadcrumbs", "breadcrumbs_ties"):
            kept = magnitude_outliers(delta, d, gammas[index])
        elif method in ("della", "della_linear"):
            kept = magprune(delta, d, epsilons[index], seed, name, index,
                            inverse=rescale == "inverse")
        else:
            raise ValueError(method)
        if rescale == "l1":
            kept = l1_rescaled(delta, kept)
        sparse.append(kept)
    consensus = method in ("ties", "dare_ties", "breadcrumbs_ties", "della")
    return combine(sparse, weights, consensus, normalize, zero_sum_sign)


def sce(deltas: torch.Tensor, select_topk: float = 1.0) -> torch.Tensor:
    """mergekit sce_merge on the task vectors τ_i = Δ_i (it takes no weights)."""
    tvs = deltas
    if select_topk <= 0:
        tvs = tvs * 0
    elif select_topk < 1:
        var = torch.var(tvs, dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * select_topk)
        mask = torch.zeros(var.numel(), dtype=tvs.dtype)
        if k > 0:
            mask[torch.topk(var.flatten(), k).indices] = 1
        tvs = tvs * mask.view_as(var)
    majority = torch.where(tvs.sum(0) >= 0, 1.0, -1.0)
    agrees = (torch.sign(tvs) == majority).to(tvs.dtype)
    mean_squares = tvs.square().reshape(len(tvs), -1).mean(1)
    total = mean_squares.sum()
    shares = (torch.full_like(mean_squares, 1 / len(tvs)) if total.abs() < 1e-6
              else mean_squares / total).view(-1, *[1] * (tvs.dim() - 1))
    erased = shares * agrees
    return (tvs * erased).sum(0) / erased.sum(0).clamp(min=1e-6)
