"""A linear layer whose weight is W_base + U·diag(σ)·Vᵀ, with only the top σ trainable."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional


class SpectralLinear(nn.Module):
    """y = x·(W_base + U·diag(σ)·Vᵀ)ᵀ + b, computed as x·W_baseᵀ + ((x·V)·σ)·Uᵀ: two thin
    products, never the m×n update. σ[:trainable] is the parameter; W_base, U, V, the rest of σ
    and the bias are frozen buffers. σ must be in descending order (the top ones are tuned)."""

    def __init__(self, base_weight: Tensor, U: Tensor, S: Tensor, V: Tensor, trainable: int,
                 bias: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("base_weight", base_weight)
        self.register_buffer("U", U)
        self.register_buffer("V", V)
        self.register_buffer("sigma_frozen", S[trainable:].clone())
        self.register_buffer("bias", bias)
        self.sigma = nn.Parameter(S[:trainable].clone())

    @property
    def full_sigma(self) -> Tensor:
        return torch.cat([self.sigma, self.sigma_frozen])

    def forward(self, x: Tensor) -> Tensor:
        update = ((x @ self.V) * self.full_sigma) @ self.U.mT
        return functional.linear(x, self.base_weight, self.bias) + update

    def folded_weight(self) -> Tensor:
        """W_base + U·diag(σ)·Vᵀ: the weight a plain nn.Linear would need."""
        return self.base_weight + (self.U * self.full_sigma) @ self.V.mT
