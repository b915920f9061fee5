"""The streaming methods, fed one delta at a time, equal the dense definitions of METHODS.md."""

from __future__ import annotations

import pytest
import torch
from reference import dare, task_arithmetic, ties

from raymerge.methods import METHODS
from raymerge.methods.dare import dare_generator, dare_keep_mask
from raymerge.methods.ties import magnitude_threshold
from raymerge.recipe import method_settings


def _stream(name: str, base: torch.Tensor, deltas: torch.Tensor, weights, **settings):
    method = METHODS[name](method_settings({"name": name, **settings}), weights)
    method.begin("layer.weight", base)
    for pass_index in range(method.passes):
        for index, delta in enumerate(deltas):
            method.update(pass_index, index, delta.clone())
    return method.finish()


def _problem(n: int, shape, seed: int):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    deltas = 0.1 * torch.randn((n, *shape), generator=generator)
    weights = (0.5 + torch.rand(n, generator=generator)).tolist()
    return base, deltas, weights


@pytest.mark.parametrize("n", [2, 3, 9])
@pytest.mark.parametrize("shape", [(33, 17), (8, 64), (50,)])
def test_task_arithmetic_is_weighted_sum(n, shape):
    base, deltas, weights = _problem(n, shape, seed=n)
    merged = _stream("task_arithmetic", base, deltas, weights)
    torch.testing.assert_close(merged.double(), task_arithmetic(deltas.double(), weights),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [2, 5, 9])
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(40, 24), (16, 70), (31,)])
def test_ties_one_pass_equals_dense_ties(n, density, shape):
    base, deltas, weights = _problem(n, shape, seed=n + int(density * 10))
    merged = _stream("ties", base, deltas, weights, density=density)
    expected = ties(deltas.double(), weights, density)
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-6)


def test_ties_keeps_the_density_fraction_and_zero_where_signs_cancel():
    values = torch.tensor([0.5, -3.0, 2.0, 0.1, -0.2, 1.0, 0.05, -0.7, 4.0, 0.3])
    kept = values.abs() >= magnitude_threshold(values, 0.3)  # k = 3 of 10
    assert kept.tolist() == [False, True, True] + [False] * 5 + [True, False]
    opposed = torch.stack([torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 1.0])])
    merged = _stream("ties", torch.zeros(2), opposed, [1.0, 1.0], density=1.0)
    assert merged.tolist() == [0.0, 1.5]  # elected sign 0 -> 0; agreeing mean of 2 and 1


@pytest.mark.parametrize("n", [2, 4])
def test_dare_equals_dense_reference_and_is_reproducible(n):
    base, deltas, weights = _problem(n, (64, 32), seed=3)
    first = _stream("dare", base, deltas, weights, p=0.6, seed=11)
    again = _stream("dare", base, deltas, weights, p=0.6, seed=11)
    other_seed = _stream("dare", base, deltas, weights, p=0.6, seed=12)
    method = METHODS["dare"](method_settings({"name": "dare", "p": 0.6, "seed": 11}), weights)
    assert torch.equal(first, again) and not torch.equal(first, other_seed)
    expected = dare(deltas.double(), weights, 0.6, 11, "layer.weight")
    torch.testing.assert_close(first.double(), expected, rtol=1e-5, atol=1e-6)
    assert method.passes == 1


def test_dare_drops_the_right_fraction_with_independent_streams():
    masks = [dare_keep_mask(torch.Size([200_000]), 0.9, dare_generator(0, name, index))
             for name, index in [("a", 0), ("a", 1), ("b", 0)]]
    for mask in masks:
        assert abs(mask.float().mean().item() - 0.1) < 0.003
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    overlap = (masks[0] & masks[1]).float().mean().item()
    assert abs(overlap - 0.01) < 0.002  # independent draws: 0.1 · 0.1


def test_dare_rescale_preserves_the_expected_delta():
    delta = torch.full((400_000,), 2.0)
    merged = _stream("dare", torch.zeros_like(delta), delta[None], [1.0], p=0.75, seed=0)
    assert set(merged.unique().tolist()) == {0.0, 8.0}
    assert abs(merged.mean().item() - 2.0) < 0.03
