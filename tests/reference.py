"""Dense reference implementations: every source's delta held at once, float64, straight from
METHODS.md. Tests compare the streaming code with these."""

from __future__ import annotations

import torch

from raymerge.methods.dare import dare_generator


def deltas_of(base: torch.Tensor, sources: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([source.double() - base.double() for source in sources])


def task_arithmetic(deltas: torch.Tensor, weights: list[float]) -> torch.Tensor:
    return sum(w * d for w, d in zip(weights, deltas))


def ties(deltas: torch.Tensor, weights: list[float], density: float | list[float]
         ) -> torch.Tensor:
    """`density`: one for all sources, or one per source."""
    densities = density if isinstance(density, list) else [density] * len(weights)
    trimmed = []
    for w, d, density in zip(weights, deltas, densities):
        weighted = w * d
        keep = max(1, int(density * weighted.numel()))
        threshold = weighted.abs().flatten().sort(descending=True).values[keep - 1]
        trimmed.append(torch.where(weighted.abs() >= threshold, weighted, 0.0))
    trimmed = torch.stack(trimmed)
    elected = torch.sign(trimmed.sum(0))
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    count = agrees.sum(0)
    total = torch.where(agrees, trimmed, 0.0).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), 0.0)


def dare(deltas: torch.Tensor, weights: list[float], p: float, seed: int, name: str
         ) -> torch.Tensor:
    merged = torch.zeros_like(deltas[0])
    for index, (w, d) in enumerate(zip(weights, deltas)):
        keep = torch.rand(d.shape, generator=dare_generator(seed, name, index)) >= p
        merged += w * torch.where(keep, d, 0.0) / (1 - p)
    return merged


def reference_merge(method: str, base: torch.Tensor, sources: list[torch.Tensor],
                    weights: list[float], name: str = "", scale: float = 1.0, density: float = 0.2,
                    p: float = 0.9, seed: int = 0) -> torch.Tensor:
    """The merged weight B + λ·M in float64."""
    deltas = deltas_of(base, sources)
    if method == "task_arithmetic":
        merged = task_arithmetic(deltas, weights)
    elif method == "ties":
        merged = ties(deltas, weights, density)
    elif method == "dare":
        merged = dare(deltas, weights, p, seed, name)
    else:
        raise ValueError(method)
    return base.double() + scale * merged
