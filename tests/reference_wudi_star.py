"""Dense float64 references of WUDI and STAR, written from the official algorithms: every
source's delta at once. WUDI is the official loop itself (nathanielyvo/WUDI-Merging,
vit/wudi_main.py): the stacked task vectors, the loss through autograd and torch.optim.Adam.
STAR is the SVC authors' (lyymuwu/SVC merge_func.py): a full SVD per source, truncation at
eta % of the nuclear norm, rescaling, the mean."""

from __future__ import annotations

import torch
from reference_spectral import svc


def wudi_loss(merged: torch.Tensor, vectors: torch.Tensor, norms_sq: torch.Tensor) -> torch.Tensor:
    """Σ_i ‖(M − Δ_i)·Δ_iᵀ‖²_F / ‖Δ_i‖²_F, as the official code writes it."""
    inner_product = torch.matmul(merged.unsqueeze(0) - vectors, vectors.transpose(1, 2))
    return torch.sum(torch.square(inner_product) / norms_sq.unsqueeze(-1).unsqueeze(-1))


def wudi(deltas: list[torch.Tensor], iter_num: int = 300, lr: float = 1e-5
         ) -> tuple[torch.Tensor, float, float]:
    """(M, loss before, loss after). Zero deltas are left out of the loss (the official code
    would divide 0 by 0 for them; raymerge defines their term as 0)."""
    vectors = torch.stack([delta for delta in deltas if bool(delta.any())])
    with torch.enable_grad():
        merged = torch.nn.Parameter(torch.sum(torch.stack(deltas), dim=0))
        optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
        norms_sq = torch.square(torch.norm(vectors.reshape(vectors.shape[0], -1), p=2, dim=-1))
        with torch.no_grad():
            before = float(wudi_loss(merged, vectors, norms_sq))
        for _ in range(iter_num):
            loss = wudi_loss(merged, vectors, norms_sq)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            after = float(wudi_loss(merged, vectors, norms_sq))
    return merged.detach(), before, after


def star_one(delta: torch.Tensor, eta: float = 40.0) -> tuple[torch.Tensor, int]:
    """One source's truncated and rescaled reconstruction, and the rank kept."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    total = S.sum()
    if total <= 1e-12:
        return torch.zeros_like(delta), 0
    cumulative = torch.cumsum(S, dim=0) / total
    rank = next((r + 1 for r in range(S.numel()) if cumulative[r] >= eta / 100), S.numel())
    kept = S[:rank] * (total / S[:rank].sum())
    return U[:, :rank] @ torch.diag(kept) @ Vh[:rank], rank


def star(deltas: list[torch.Tensor], etas: list[float]) -> tuple[torch.Tensor, list[int]]:
    parts = [star_one(delta, eta) for delta, eta in zip(deltas, etas)]
    return sum(part for part, _ in parts) / len(parts), [rank for _, rank in parts]


def reference_wudi_star(method: str, name: str, base: torch.Tensor, sources: list[torch.Tensor],
                        weights: list[float], scale: float = 1.0, svc_alpha: float | None = None,
                        exclude=("embed_tokens", "lm_head"), iter_num: int = 300,
                        lr: float = 1e-5, eta: float | list[float] = 40.0) -> torch.Tensor:
    """The merged weight in float64: B + λ·M (then SVC on matrices when svc_alpha is set)."""
    base = base.double()
    deltas = [source.double() - base for source in sources]
    weighted = [w * d for w, d in zip(weights, deltas)]
    if base.dim() != 2 or any(pattern in name for pattern in exclude):
        return base + scale * sum(weighted) / len(weighted)
    if method == "wudi":
        merged = wudi(weighted, iter_num, lr)[0]
    else:
        etas = eta if isinstance(eta, list) else [eta] * len(weighted)
        merged = star(weighted, etas)[0]
    merged = scale * merged
    if svc_alpha is not None:
        merged = svc(merged, deltas, svc_alpha)
    return base + merged
