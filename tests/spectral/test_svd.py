"""The SVD paths agree with the exact SVD within stated bounds on realistic spectra."""

from __future__ import annotations

import pytest
import torch

from raymerge.spectral.svd import exact_svd, factored_svd, polar, randomized_svd, truncated_svd


def low_rank_plus_noise(rows: int, cols: int, rank: int = 12, noise: float = 0.01, seed: int = 0):
    """A fine-tuning delta's spectrum: a few strong directions decaying, over a noise floor."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(rows, rank, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(cols, rank, generator=generator)).Q
    strengths = torch.logspace(0, -1.5, rank)
    return (left * strengths) @ right.T + noise * torch.randn(rows, cols, generator=generator) \
        / (rows * cols) ** 0.25


# Documented bounds of the randomized path (oversampling 10, 2 power iterations, float32):
# - top-q inside the strong part of the spectrum (a gap after σ_q, as fine-tuning deltas have
#   after their few leading directions): the exact rank-q truncation to 1e-4 relative, each σ to
#   1e-5 relative;
# - q reaching into the noise floor, where the exact truncation itself is not well determined:
#   residual ‖A − Ã_q‖ within 1.01 × the optimal ‖A − A_q‖, each σ within 10%.
SIGNAL_TRUNCATION, SIGNAL_SIGMA = 1e-4, 1e-5
FLOOR_RESIDUAL, FLOOR_SIGMA = 1.01, 0.10


@pytest.mark.parametrize("shape", [(512, 256), (256, 512), (384, 384)])
@pytest.mark.parametrize("rank", [4, 8, 16, 24])
def test_randomized_svd_within_documented_bound(shape, rank):
    matrix = low_rank_plus_noise(*shape)  # 12 strong directions
    U, S, V = exact_svd(matrix)
    Ur, Sr, Vr = randomized_svd(matrix, rank, seed=3)
    exact_truncation = (U[:, :rank] * S[:rank]) @ V[:, :rank].T
    approximate = (Ur * Sr) @ Vr.T
    sigma_error = float(((Sr - S[:rank]).abs() / S[:rank]).max())
    if rank <= 8:
        assert float((approximate - exact_truncation).norm() / exact_truncation.norm()) \
            < SIGNAL_TRUNCATION
        assert sigma_error < SIGNAL_SIGMA
    else:
        optimal = (matrix - exact_truncation).norm()
        assert float((matrix - approximate).norm() / optimal) < FLOOR_RESIDUAL
        assert sigma_error < FLOOR_SIGMA
    torch.testing.assert_close(Ur.T @ Ur, torch.eye(rank), atol=1e-5, rtol=0)
    assert torch.equal(randomized_svd(matrix, rank, seed=3).U, Ur)  # seeded: reruns identical


def test_auto_picks_randomized_only_for_small_rank():
    matrix = low_rank_plus_noise(256, 200)
    small = truncated_svd(matrix, 8, "auto")
    large = truncated_svd(matrix, 150, "auto")
    exact = exact_svd(matrix)
    assert not torch.equal(small.S, exact.S[:8])  # the sketch, not the full SVD
    torch.testing.assert_close(small.S, exact.S[:8], rtol=SIGNAL_SIGMA, atol=0)
    assert torch.equal(large.S, exact.S[:150])


def test_factored_svd_equals_svd_of_the_product():
    generator = torch.Generator().manual_seed(1)
    left = torch.randn(300, 6, generator=generator, dtype=torch.float64)
    right = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    scales = torch.rand(6, generator=generator, dtype=torch.float64) + 0.5
    U, S, V = factored_svd(left, scales, right)
    product = (left * scales) @ right.T
    torch.testing.assert_close((U * S) @ V.T, product)
    torch.testing.assert_close(S, torch.linalg.svdvals(product)[:6])
    torch.testing.assert_close(U.T @ U, torch.eye(6, dtype=torch.float64))


def test_polar_factor_is_orthonormal_and_closest():
    matrix = low_rank_plus_noise(64, 20, rank=20).double()
    factor = polar(matrix)
    torch.testing.assert_close(factor.T @ factor, torch.eye(20, dtype=torch.float64))
    U, _, V = exact_svd(matrix)
    torch.testing.assert_close(factor, U @ V.T)


def test_randomized_svd_of_an_exactly_low_rank_matrix_falls_back_safely():
    """Rank 3 but 20 triplets asked: the sketch is rank deficient, CholeskyQR cannot work, and
    the Householder fallback must still give an orthonormal, exact answer."""
    generator = torch.Generator().manual_seed(5)
    matrix = torch.randn(200, 3, generator=generator) @ torch.randn(3, 150, generator=generator)
    U, S, V = randomized_svd(matrix, 20)
    torch.testing.assert_close((U * S) @ V.T, matrix, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S[:3], exact_svd(matrix).S[:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(U[:, :3].T @ U[:, :3], torch.eye(3), atol=1e-5, rtol=0)


def test_an_svd_that_does_not_converge_in_float32_is_done_in_float64(monkeypatch):
    """LAPACK's float32 divide-and-conquer SVD failed to converge on a real Iso-CTS stack (CPU,
    one thread); every SVD path then redoes it in float64 and returns float32."""
    real_svd = torch.linalg.svd
    attempts = []

    def float32_fails(matrix, *args, **kwargs):
        attempts.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(matrix, *args, **kwargs)

    matrix = low_rank_plus_noise(48, 20, rank=20)
    expected_U, expected_S, expected_V = exact_svd(matrix.double())
    monkeypatch.setattr(torch.linalg, "svd", float32_fails)

    U, S, V = exact_svd(matrix)
    assert attempts == [torch.float32, torch.float64]
    assert U.dtype == S.dtype == V.dtype == torch.float32
    torch.testing.assert_close(S, expected_S.float())
    torch.testing.assert_close((U * S) @ V.T, matrix, atol=1e-5, rtol=1e-5)
    factor = polar(matrix)
    assert factor.dtype == torch.float32
    torch.testing.assert_close(factor, (expected_U @ expected_V.T).float(), atol=1e-5, rtol=1e-5)
    left, right = matrix[:, :5], torch.randn(30, 5, dtype=torch.float32)
    _, factored_S, _ = factored_svd(left, torch.ones(5), right)
    torch.testing.assert_close(factored_S, torch.linalg.svdvals((left @ right.T).double())[:5]
                               .float(), atol=1e-5, rtol=1e-5)
