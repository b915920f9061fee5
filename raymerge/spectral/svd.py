"""Thin SVDs, Δ = U·diag(σ)·Vᵀ with σ descending: exact, randomized truncated, and factored (for
a product of thin factors, such as a LoRA update or a pool of rank-one components).

Randomized truncated SVD (Halko, Martinsson & Tropp 2011, Algorithm 4.4): a seeded Gaussian sketch
with `oversample` extra columns and `power_iterations` re-orthonormalised power steps. Its
error against the exact top-q triplets is bounded in tests/spectral/test_svd.py on low-rank-plus-
noise matrices (the spectrum fine-tuning deltas have).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

OVERSAMPLE = 10
POWER_ITERATIONS = 2
_ORTHONORMAL_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}
# auto: randomized when the sketch is at most this fraction of the full rank
RANDOMIZED_FRACTION = 0.25


class Svd(NamedTuple):
    U: Tensor  # m × q
    S: Tensor  # q, descending
    V: Tensor  # n × q  (Δ ≈ U·diag(S)·Vᵀ)


def exact_svd(matrix: Tensor) -> Svd:
    """Full thin SVD. On CUDA the fast `gesvda` driver is tried first and kept only when its
    reconstruction agrees with the matrix to float tolerance."""
    if matrix.is_cuda:
        try:
            U, S, Vh = torch.linalg.svd(matrix, full_matrices=False, driver="gesvda")
        except RuntimeError:  # a shape or build without gesvda: the default driver below
            pass
        else:
            residual = torch.linalg.matrix_norm(matrix - (U * S) @ Vh)
            scale = torch.linalg.matrix_norm(matrix).clamp(min=torch.finfo(matrix.dtype).tiny)
            if bool(torch.isfinite(residual)) and float(residual / scale) < _tolerance(matrix):
                return Svd(U, S, Vh.mT)
    U, S, Vh = svd(matrix)
    return Svd(U, S, Vh.mT)


def svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """torch.linalg.svd (thin). LAPACK's divide-and-conquer driver can fail to converge on an
    ill-conditioned float32 matrix: seen on CPU, one thread, for a 576×576 Iso-CTS stack of
    unit singular vectors from real SmolLM2 fine-tunes (smallest σ 3e-4). Then the same SVD in
    float64, cast back."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        if matrix.dtype == torch.float64:
            raise
        U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return U.to(matrix.dtype), S.to(matrix.dtype), Vh.to(matrix.dtype)


def randomized_svd(matrix: Tensor, rank: int, seed: int = 0, oversample: int = OVERSAMPLE,
                   power_iterations: int = POWER_ITERATIONS) -> Svd:
    """Top-`rank` triplets from a sketch of rank + oversample columns."""
    rows, cols = matrix.shape
    sketch = min(rank + oversample, rows, cols)
    # drawn where the matrix is (a CPU draw plus a copy costs more than the whole sketch on a
    # GPU); the same seed on the same kind of device gives the same sketch
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    omega = torch.randn(cols, sketch, generator=generator, dtype=matrix.dtype,
                        device=matrix.device)
    basis = orthonormalize(matrix @ omega)
    for _ in range(power_iterations):
        basis = orthonormalize(matrix.mT @ basis)
        basis = orthonormalize(matrix @ basis)
    # matrix ≈ basis·B with B = basisᵀ·matrix (sketch × cols); Bᵀ = Q·R, so B = Rᵀ·Qᵀ and the SVD
    # of the small sketch × sketch Rᵀ gives B's: no SVD of a wide matrix is needed.
    q_right, r_right = _thin_qr(matrix.mT @ basis)
    U, S, Wh = _small_svd(r_right.mT)
    return leading_triplets(basis @ U, S, q_right @ Wh.mT, rank)


def _small_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of a small square matrix; on CUDA the Jacobi driver, far quicker at this size."""
    if matrix.is_cuda:
        try:
            return torch.linalg.svd(matrix, driver="gesvdj")
        except RuntimeError:
            pass
    return svd(matrix)


def orthonormalize(columns: Tensor) -> Tensor:
    return _thin_qr(columns)[0]


def _thin_qr(columns: Tensor) -> tuple[Tensor, Tensor]:
    """Thin QR of a tall matrix. On GPUs CholeskyQR2 (two rounds of R = chol(XᵀX), Q = X·R⁻¹:
    matrix products and a small Cholesky), several times faster there than Householder QR;
    when the columns are too ill-conditioned for it (Cholesky fails, or Q comes out not
    orthonormal), and on CPUs, where it is not faster, Householder QR."""
    if not columns.is_cuda:
        return torch.linalg.qr(columns)
    q, r = columns, None
    for _ in range(2):
        factor, info = torch.linalg.cholesky_ex(q.mT @ q, upper=True)
        if bool(info.any()):
            return torch.linalg.qr(columns)
        q = torch.linalg.solve_triangular(factor, q, upper=True, left=False)
        r = factor if r is None else factor @ r
    identity = torch.eye(q.shape[1], dtype=q.dtype, device=q.device)
    departure = (q.mT @ q - identity).abs().max()
    if not bool(departure < _ORTHONORMAL_TOLERANCE[q.dtype]):  # also catches NaN
        return torch.linalg.qr(columns)
    return q, r


def truncated_svd(matrix: Tensor, rank: int, mode: str = "auto", seed: int = 0) -> Svd:
    """Top-`rank` triplets by the path `mode` asks for: exact | randomized | auto."""
    rank = min(rank, min(matrix.shape))
    if uses_randomized(mode, rank, matrix.shape):
        return randomized_svd(matrix, rank, seed=seed)
    U, S, V = exact_svd(matrix)
    return leading_triplets(U, S, V, rank)


def uses_randomized(mode: str, rank: int, shape) -> bool:
    """Whether truncated_svd takes the randomized path for this rank and shape."""
    return mode == "randomized" or (
        mode == "auto" and rank + OVERSAMPLE <= RANDOMIZED_FRACTION * min(shape))


def truncated_svd_settings(mode: str, rank: int, shape, seed: int, dtype: torch.dtype,
                           device: torch.device) -> dict:
    """Everything truncated_svd's result depends on besides the matrix: a cache key's part."""
    rank = min(rank, min(shape))
    randomized = uses_randomized(mode, rank, shape)
    return {"op": "truncated_svd", "rank": rank, "dtype": str(dtype), "device": device.type,
            "path": (f"randomized(oversample={OVERSAMPLE},power={POWER_ITERATIONS},seed={seed})"
                     if randomized else "exact")}


def leading_triplets(U: Tensor, S: Tensor, V: Tensor, rank: int) -> Svd:
    """The first `rank` triplets as tensors of their own: a slice would keep the whole SVD
    alive, and methods that keep triplets from every source (TSV-M, Iso-CTS) would then hold
    memory that grows with N."""
    return Svd(U[:, :rank].contiguous(), S[:rank].clone(), V[:, :rank].contiguous())


def factored_svd(left: Tensor, scales: Tensor, right: Tensor) -> Svd:
    """SVD of left·diag(scales)·rightᵀ (left m×q, right n×q, any q) without forming the m×n
    product: QR of both factors, then the SVD of a q×q core."""
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right)
    core = (r_left * scales) @ r_right.mT
    U, S, Vh = svd(core)
    return Svd(q_left @ U, S, q_right @ Vh.mT)


def without_null_components(U: Tensor, S: Tensor, V: Tensor) -> Svd:
    """Drop the triplets whose σ is zero to working precision (σ ≤ max(m, n)·ε·σ_max, or all
    of them for a zero matrix): their singular vectors are arbitrary, and in a stack that is
    polar-orthogonalised (TSV-M, Iso-CTS) they would add arbitrary directions. A rank-r source
    (a LoRA update; zero where the adapter does not reach) thus contributes exactly its r
    components, dense or factored."""
    if S.numel() == 0:
        return Svd(U, S, V)
    keep = S > max(U.shape[0], V.shape[0]) * torch.finfo(S.dtype).eps * S.max()
    if bool(keep.all()):
        return Svd(U, S, V)
    keep = keep.nonzero().flatten()
    return Svd(U[:, keep], S[keep], V[:, keep])  # index selection copies


def polar(matrix: Tensor) -> Tensor:
    """The orthogonal polar factor P·Qᵀ of matrix = P·diag(σ)·Qᵀ (columns orthonormalised)."""
    P, _, Qh = svd(matrix)
    return P @ Qh


def _tolerance(matrix: Tensor) -> float:
    return 1e-4 if matrix.dtype == torch.float32 else 1e-10
