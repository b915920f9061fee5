"""A dense float64 transcription of the official ACE-Merging (unravel-xu/ACE-Merging,
src/merge/strategy.py, `ace_merging`), one matrix: every task matrix and every per-task
covariance held at once, the explicit inverse, the official order of operations. It differs from
the official function only where that one gives NaN: with one source (torch.var of one value)
the branch is the homogeneous one, and a refinement rank ⌊k_frac·r⌋ = 0 adds nothing."""

from __future__ import annotations

import torch


def ace(deltas: list[torch.Tensor], eps: float = 1e-2, k_frac: float = 0.3
        ) -> tuple[torch.Tensor, bool]:
    """(M, whether the heterogeneous branch ran) for the weighted task matrices `deltas`."""
    deltas = [delta.double() for delta in deltas]
    count, in_dim = len(deltas), deltas[0].shape[1]
    traces = torch.tensor([torch.trace(delta.T @ delta).item() for delta in deltas],
                          dtype=torch.float64)
    log_traces = torch.log(traces + 1e-12)
    gamma = (torch.var(log_traces) / (torch.mean(log_traces).pow(2) + 1e-12)
             if count > 1 else torch.tensor(0.0))
    heterogeneous = bool(gamma > 0.3)
    avg_trace = traces.mean().item()

    covariances = []
    weighted_sum = torch.zeros_like(deltas[0])
    covariance_sum = torch.zeros(in_dim, in_dim, dtype=torch.float64)
    for delta in deltas:
        centred = delta - delta.mean(dim=0, keepdim=True)
        raw = centred.T @ centred
        trace = torch.trace(raw) + 1e-12
        covariance, ridge = (raw / trace, eps / trace) if heterogeneous else (raw, eps)
        covariances.append(covariance)
        covariance = covariance + ridge * torch.eye(in_dim, dtype=torch.float64)
        weighted_sum += centred @ covariance
        covariance_sum += covariance
    aggregate = torch.mean(sum(covariances), dim=0, keepdim=True)  # a row, broadcast below
    if heterogeneous:
        aggregate = aggregate / (avg_trace + 1e-12)
    merged = weighted_sum @ torch.linalg.inv(covariance_sum + aggregate)
    if heterogeneous:
        mean_covariance = covariance_sum / count
        residual = torch.zeros_like(deltas[0])
        for delta, covariance in zip(deltas, covariances):  # the un-centred task matrices
            residual += delta @ (covariance - mean_covariance)
        U, S, Vh = torch.linalg.svd(residual + merged, full_matrices=False)
        k = int(S.numel() * k_frac)
        if k > 0:
            merged = merged + S[:k].mean() * (U[:, :k] @ Vh[:k, :])
    return merged, heterogeneous
