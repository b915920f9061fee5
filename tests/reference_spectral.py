"""Dense float64 references of the spectral methods and SVC, straight from METHODS.md: every
source's delta at once, full SVDs."""

from __future__ import annotations

import torch


def _svd(matrix: torch.Tensor):
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U, S, Vh


def _drop_null(U, S, Vh):
    """Components with σ = 0 to working precision are absent, as in raymerge."""
    if S.numel() == 0:
        return U, S, Vh
    keep = S > max(U.shape[0], Vh.shape[1]) * torch.finfo(S.dtype).eps * S.max()
    return U[:, keep], S[keep], Vh[keep]


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    P, _, Qh = torch.linalg.svd(matrix, full_matrices=False)
    return P @ Qh


def axis(weighted: list[torch.Tensor], keep: int) -> torch.Tensor:
    """All N·r components pooled at once; the K largest σ (ties: lower source, then lower index)."""
    pool = []
    for source, delta in enumerate(weighted):
        U, S, Vh = _svd(delta)
        pool += [(-float(S[j]), source, j, S[j], U[:, j], Vh[j]) for j in range(S.numel())]
    pool.sort(key=lambda item: item[:3])
    return sum(sigma * torch.outer(u, v) for *_, sigma, u, v in pool[:keep])


# Each returns (U, σ, Vᵀ) with M = U·diag(σ)·Vᵀ in the basis the method defines M in; SVC uses
# that basis (for Iso's flat spectrum any other SVD basis would be arbitrary).


def tsv(weighted: list[torch.Tensor]):
    k = min(weighted[0].shape) // len(weighted)
    Us, Ss, Vs = zip(*[_drop_null(U[:, :k], S[:k], Vh[:k]) for U, S, Vh in map(_svd, weighted)])
    Vs = [Vh.T for Vh in Vs]
    U_cat, S_cat, V_cat = torch.cat(Us, 1), torch.cat(Ss), torch.cat(Vs, 1)
    return _polar(U_cat), S_cat, _polar(V_cat.T)


def iso_c(weighted: list[torch.Tensor]):
    U, S, Vh = _svd(sum(weighted))
    return U, S.mean().expand_as(S), Vh


def iso_cts(weighted: list[torch.Tensor]) -> torch.Tensor:
    n = len(weighted)
    r = min(weighted[0].shape)
    c = int(0.8 * r)
    c = r - round((r - c) / n) * n
    s = (r - c) // n
    U, S, Vh = _svd(sum(weighted))
    U_c, S_c, Vh_c = U[:, :c], S[:c], Vh[:c]
    blocks_U, blocks_S, blocks_Vh = [], [], []
    for delta in weighted:
        Ui, Si, Vhi = _svd(delta - U_c @ U_c.T @ delta)
        Ui, Si, Vhi = _drop_null(Ui[:, :s], Si[:s], Vhi[:s])
        blocks_U.append(Ui)
        blocks_S.append(Si)
        blocks_Vh.append(Vhi)
    U_all = torch.cat([*blocks_U, U_c], 1)
    S_all = torch.cat([*blocks_S, S_c])
    Vh_all = torch.cat([*blocks_Vh, Vh_c], 0)
    return _polar(U_all), S_all.mean().expand_as(S_all), _polar(Vh_all.T).T


def svc(merged: torch.Tensor, deltas: list[torch.Tensor], alpha: float,
        basis=None) -> torch.Tensor:
    """basis: (U, σ, Vᵀ) of `merged`; its own SVD when None."""
    U, S, Vh = basis if basis is not None else _svd(merged)
    merged_rows = U.T @ merged
    clipped = []
    for delta in deltas:
        rows = U.T @ delta
        strength = (merged_rows * rows).sum(1) / rows.square().sum(1).clamp(min=1e-12)
        clipped.append(strength.clamp(min=alpha))
    gamma = 1.0 / torch.stack(clipped).mean(0)
    return U @ torch.diag(gamma * S) @ Vh


SPECTRAL = {"tsv": tsv, "iso_c": iso_c, "iso_cts": iso_cts}


def spectral_role(name: str, shape, exclude=("embed_tokens", "lm_head")) -> str | None:
    """docs/methods.md's rule: "matrix" for a 2-D linear map (not excluded, not a bias, not an
    embedding or head by role), "stack" for a 3-D stack of an experts module, else None."""
    import re

    from raymerge.roles import is_vocabulary_role

    excluded = any(re.search(pattern, name) for pattern in exclude)
    bias = re.search(r"(?:^|[._])bias$", name) is not None
    if len(shape) == 2 and not (excluded or bias or is_vocabulary_role(name)):
        return "matrix"
    if len(shape) == 3 and ".experts." in f".{name}" and not (excluded or bias):
        return "stack"
    return None


def reference_spectral(method: str, name: str, base: torch.Tensor, sources: list[torch.Tensor],
                       weights: list[float], scale: float = 1.0, k: int | float = 0.1,
                       svc_alpha: float | None = None,
                       exclude=("embed_tokens", "lm_head")) -> torch.Tensor:
    """The merged weight in float64."""
    base = base.double()
    deltas = [source.double() - base for source in sources]
    weighted = [w * d for w, d in zip(weights, deltas)]
    if spectral_role(name, base.shape, exclude) != "matrix":
        return base + scale * sum(weighted) / len(weighted)
    basis = None
    if method == "axis":
        rank = min(base.shape)
        merged = axis(weighted, k if isinstance(k, int) else max(1, int(k * rank)))
    else:
        U, S, Vh = SPECTRAL[method](weighted)
        merged = U @ torch.diag(S) @ Vh
        basis = (U, scale * S, Vh)  # for scale >= 0
    merged = scale * merged
    if svc_alpha is not None:
        merged = svc(merged, deltas, svc_alpha, basis)
    return base + merged
