"""Swap a transformers model's target linears for SpectralLinear layers."""

from __future__ import annotations

import math

from torch import Tensor, nn

from .spectral_linear import SpectralLinear


def trainable_count(n: int | float | None, rank: int) -> int:
    """`n` σ per matrix: all (None), a count, or a fraction of the stored rank."""
    if n is None:
        return rank
    if isinstance(n, float):
        return max(1, min(rank, math.floor(n * rank)))
    return max(0, min(rank, n))


def attach_spectral_layers(model: nn.Module, factors: dict[str, tuple[Tensor, Tensor, Tensor]],
                           base_weights: dict[str, Tensor], n: int | float | None = None
                           ) -> dict[str, SpectralLinear]:
    """Replace each nn.Linear whose `<module>.weight` has factors; returns them by tensor name.
    Factors are put in descending σ order so the trainable ones are the largest."""
    swapped = {}
    for module_name, module in list(model.named_modules()):
        tensor_name = f"{module_name}.weight"
        if not isinstance(module, nn.Linear) or tensor_name not in factors:
            continue
        U, S, V = factors[tensor_name]
        order = S.argsort(descending=True, stable=True)
        dtype = module.weight.dtype
        layer = SpectralLinear(
            base_weights[tensor_name].to(dtype), U[:, order].to(dtype), S[order].to(dtype),
            V[:, order].to(dtype), trainable_count(n, S.numel()),
            None if module.bias is None else module.bias.detach().clone())
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        swapped[tensor_name] = layer
    missing = sorted(set(factors) - set(swapped))
    if missing:
        raise ValueError(f"factors for {missing[0]} match no nn.Linear of the model")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for layer in swapped.values():
        layer.sigma.requires_grad_(True)
    return swapped
