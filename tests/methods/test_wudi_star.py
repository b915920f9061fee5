"""WUDI and STAR streamed, against dense float64 implementations of the official algorithms
(tests/reference_wudi_star.py): WUDI's official Adam loop through autograd on all N task
vectors, STAR's per-source SVD, truncation and mean.

Tolerances: float64 compute 1e-10 relative (measured ≤ 6e-14); float32 compute against the
float64 reference 1e-5 relative at the default learning rate (measured ≤ 2e-6), 5e-5 at a
learning rate 100× larger, where Adam runs close to convergence and amplifies rounding
(measured ≤ 1.4e-5); STAR float32 1e-5 (measured ≤ 1.4e-6)."""

from __future__ import annotations

import pytest
import torch
from reference_wudi_star import star, wudi

from raymerge.errors import RecipeError
from raymerge.factor_cache import FactorCache, FactorCacheSpec
from raymerge.methods import MergeOptions, build_method
from raymerge.recipe import method_settings, recipe_from_dict

MATRIX = "model.layers.0.mlp.up_proj.weight"


def _deltas(shape, count, seed, scale=1e-2, dtype=torch.float64):
    """Low-rank-plus-noise deltas, the spectrum fine-tunes have."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = shape
    return [((torch.randn(rows, 3, generator=generator, dtype=torch.float64)
              @ torch.randn(3, cols, generator=generator, dtype=torch.float64)
              + 0.3 * torch.randn(rows, cols, generator=generator, dtype=torch.float64))
             * scale * (1 + 0.5 * i)).to(dtype) for i in range(count)]


def _stream(method, deltas, weights=None, name=MATRIX, options=None, source_settings=None,
            **settings):
    weights = weights or [1.0] * len(deltas)
    resolved = method_settings({"name": method, **settings})
    merger = build_method(resolved, weights, options or MergeOptions(),
                          source_settings=source_settings)
    merger.begin(name, torch.zeros_like(deltas[0]))
    for pass_index in range(merger.passes):
        for index, delta in enumerate(deltas):
            merger.update(pass_index, index, delta.clone())
    return merger.finish(), merger.report


def _relative(actual, expected) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (30, 30)])
@pytest.mark.parametrize("count, iter_num, lr", [(2, 60, 1e-5), (5, 40, 1e-3)])
def test_wudi_equals_the_official_adam_loop_in_float64(shape, count, iter_num, lr):
    deltas = _deltas(shape, count, seed=count)
    weights = [1.0, 0.5, 1.5, 0.75, 1.25][:count]
    merged, report = _stream("wudi", deltas, weights, iter_num=iter_num, lr=lr)
    expected, before, after = wudi([w * d for w, d in zip(weights, deltas)], iter_num, lr)
    assert _relative(merged, expected) < 1e-10
    # the optimisation moved M away from the sum, and lowered the loss
    assert _relative(sum(w * d for w, d in zip(weights, deltas)), expected) > 1e-3
    assert after < before
    assert report.stats["wudi_loss_before"] == pytest.approx(before, rel=1e-10)
    assert report.stats["wudi_loss_after"] == pytest.approx(after, rel=1e-10)


def test_wudi_defaults_are_the_official_ones_300_adam_steps_at_1e_5():
    settings = method_settings({"name": "wudi"})
    assert (settings.iter_num, settings.lr) == (300, 1e-5)
    deltas = _deltas((6, 4), 3, seed=7, scale=1e-3)
    merged, report = _stream("wudi", deltas)
    expected, before, after = wudi(deltas)  # 300 steps, lr 1e-5
    assert _relative(merged, expected) < 1e-10
    assert _relative(wudi(deltas, iter_num=299)[0], expected) > 1e-6  # every step counts
    assert report.stats["wudi_loss_after"] == pytest.approx(after, rel=1e-10)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
@pytest.mark.parametrize("lr, tolerance", [(1e-5, 1e-5), (1e-3, 5e-5)])
def test_wudi_in_float32_is_within_tolerance_of_float64(shape, lr, tolerance):
    deltas = _deltas(shape, 4, seed=3, scale=1e-3)
    merged, report = _stream("wudi", [d.float() for d in deltas], iter_num=100, lr=lr)
    expected, _, after = wudi(deltas, 100, lr)
    assert merged.dtype == torch.float32
    assert _relative(merged, expected) < tolerance
    assert report.stats["wudi_loss_after"] == pytest.approx(after, rel=1e-4)


def test_wudi_zero_iterations_is_the_sum_of_task_vectors():
    deltas = _deltas((10, 8), 3, seed=1)
    merged, report = _stream("wudi", deltas, [1.0, 2.0, 0.5], iter_num=0)
    torch.testing.assert_close(merged, deltas[0] + 2 * deltas[1] + 0.5 * deltas[2])
    assert report.stats["wudi_loss_before"] == report.stats["wudi_loss_after"]


def test_wudi_leaves_a_source_that_did_not_change_out_of_the_loss():
    """The official code would divide 0 by 0 (NaN everywhere) for a zero task vector."""
    deltas = _deltas((12, 9), 3, seed=2)
    with_zero = [deltas[0], torch.zeros_like(deltas[0]), *deltas[1:]]
    merged, report = _stream("wudi", with_zero, iter_num=30, lr=1e-4)
    assert bool(torch.isfinite(merged).all())
    torch.testing.assert_close(merged, wudi(deltas, 30, 1e-4)[0], rtol=1e-10, atol=1e-14)


def test_wudi_lora_factors_give_the_dense_result():
    generator = torch.Generator().manual_seed(5)
    factors = [(torch.randn(20, 3, generator=generator, dtype=torch.float64) * 0.05,
                torch.randn(14, 3, generator=generator, dtype=torch.float64) * 0.05)
               for _ in range(3)]
    dense, dense_report = _stream("wudi", [left @ right.T for left, right in factors],
                                  iter_num=25, lr=1e-4)
    merger = build_method(method_settings({"name": "wudi", "iter_num": 25, "lr": 1e-4}),
                          [1.0, 1.0, 1.0], MergeOptions())
    merger.begin(MATRIX, torch.zeros(20, 14, dtype=torch.float64))
    for index, (left, right) in enumerate(factors):
        merger.update_factored(0, index, left, right)
    torch.testing.assert_close(merger.finish(), dense, rtol=1e-10, atol=1e-14)
    assert merger.report.stats["wudi_loss_before"] == pytest.approx(
        dense_report.stats["wudi_loss_before"], rel=1e-10)


@pytest.mark.parametrize("method", ["wudi", "star"])
def test_non_matrices_and_excluded_tensors_are_the_weighted_mean(method):
    deltas = [torch.full((6,), 2.0), torch.full((6,), 4.0)]
    merged, report = _stream(method, deltas, [1.0, 0.5], name="model.norm.weight")
    assert merged.tolist() == [2.0] * 6 and report.stats == {}  # (2 + 0.5·4)/2
    embedding = _deltas((8, 4), 2, seed=0)
    merged, _ = _stream(method, embedding, [1.0, 0.5], name="model.embed_tokens.weight")
    torch.testing.assert_close(merged, (embedding[0] + 0.5 * embedding[1]) / 2)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (30, 30)])
@pytest.mark.parametrize("eta", [0.0, 10.0, 40.0, 75.0, 100.0])
def test_star_equals_the_dense_definition_in_float64(shape, eta):
    deltas = _deltas(shape, 4, seed=int(eta))
    weights = [1.0, 0.5, 1.5, -0.75]
    merged, report = _stream("star", deltas, weights, eta=eta)
    expected, ranks = star([w * d for w, d in zip(weights, deltas)], [eta] * 4)
    assert _relative(merged, expected) < 1e-10
    assert report.stats["star_rank_per_source"] == ranks
    if eta == 100.0:  # nothing truncated: the mean
        torch.testing.assert_close(merged, sum(w * d for w, d in zip(weights, deltas)) / 4)
    if eta == 0.0:  # one component, carrying the whole nuclear norm
        assert ranks == [1, 1, 1, 1]


def test_star_default_eta_is_40_and_truncates():
    assert method_settings({"name": "star"}).eta == 40.0
    deltas = _deltas((30, 20), 3, seed=9)
    merged, report = _stream("star", deltas)
    expected, ranks = star(deltas, [40.0] * 3)
    assert _relative(merged, expected) < 1e-10
    assert all(1 <= rank < 20 for rank in report.stats["star_rank_per_source"])


def test_star_in_float32_is_within_tolerance_of_float64():
    deltas = _deltas((40, 24), 4, seed=4)
    merged, _ = _stream("star", [d.float() for d in deltas])
    assert _relative(merged, star(deltas, [40.0] * 4)[0]) < 1e-5


def test_star_eta_per_source():
    deltas = _deltas((24, 16), 3, seed=6)
    shared = method_settings({"name": "star"})
    per_source = [shared.model_copy(update={"eta": eta}) for eta in (20.0, 40.0, 90.0)]
    merged, report = _stream("star", deltas, source_settings=per_source)
    expected, ranks = star(deltas, [20.0, 40.0, 90.0])
    assert _relative(merged, expected) < 1e-10 and report.stats["star_rank_per_source"] == ranks
    assert ranks[0] < ranks[1] < ranks[2]


def test_star_lora_factors_give_the_dense_result():
    generator = torch.Generator().manual_seed(8)
    factors = [(torch.randn(20, 4, generator=generator, dtype=torch.float64),
                torch.randn(14, 4, generator=generator, dtype=torch.float64)) for _ in range(3)]
    dense, _ = _stream("star", [left @ right.T for left, right in factors])
    merger = build_method(method_settings({"name": "star"}), [1.0] * 3, MergeOptions())
    merger.begin(MATRIX, torch.zeros(20, 14, dtype=torch.float64))
    for index, (left, right) in enumerate(factors):
        merger.update_factored(0, index, left, right)
    torch.testing.assert_close(merger.finish(), dense, rtol=1e-9, atol=1e-12)


def test_star_of_an_unchanged_source_adds_nothing():
    deltas = _deltas((12, 10), 2, seed=3)
    merged, report = _stream("star", [deltas[0], torch.zeros_like(deltas[0]), deltas[1]])
    expected = (star(deltas[:1], [40.0])[0] + star(deltas[1:], [40.0])[0]) / 3
    assert _relative(merged, expected) < 1e-10
    assert report.stats["star_rank_per_source"][1] == 0


def test_star_takes_its_sources_from_the_factor_cache(tmp_path):
    deltas = _deltas((24, 16), 3, seed=11)
    spec = FactorCacheSpec(root=str(tmp_path), base="base", sources=("a", "b", "c"))

    def cached_merge():
        cache = FactorCache(spec)
        merger = build_method(method_settings({"name": "star"}), [1.0, 0.5, 1.0],
                              MergeOptions(factor_cache=cache))
        merger.begin(MATRIX, torch.zeros(24, 16, dtype=torch.float64))
        for index, delta in enumerate(deltas):
            if not merger.cached_update(0, index):
                merger.update(0, index, delta.clone())
        return merger.finish(), cache

    first, cache = cached_merge()
    assert (cache.hits, cache.misses) == (0, 3)
    second, cache = cached_merge()
    assert (cache.hits, cache.misses) == (3, 0)
    assert torch.equal(first, second)
    expected = star([deltas[0], 0.5 * deltas[1], deltas[2]], [40.0] * 3)[0]
    assert _relative(second, expected) < 1e-10


@pytest.mark.parametrize("block, message", [
    ({"name": "star", "eta": 101}, "eta"),
    ({"name": "star", "eta": -1}, "eta"),
    ({"name": "wudi", "iter_num": -1}, "iter_num"),
    ({"name": "wudi", "lr": 0}, "lr"),
    ({"name": "wudi", "density": 0.2}, "density"),
    ({"name": "star", "seed": 1}, "seed"),
])
def test_out_of_range_or_foreign_keys_are_recipe_errors(block, message):
    with pytest.raises((RecipeError, ValueError), match=message):
        recipe_from_dict({"base": "b", "sources": ["s1", "s2"], "method": block})


def test_svc_alpha_auto_is_the_svc_authors_per_method():
    def recipe(method):
        return recipe_from_dict({"base": "b", "sources": ["s1", "s2", "s3", "s4"],
                                 "method": {"name": method},
                                 "calibrate": {"svc": {"alpha": "auto"}}})

    assert recipe("wudi").svc_alpha() == 1.0  # their FusionBench config, as after TSV-M
    assert "wudi.yaml" in recipe("wudi").svc_alpha_rule()[1]
    assert recipe("star").svc_alpha() == 0.25  # 1/N, their default for every other method


def test_wudi_steps_and_learning_rate_may_vary_over_the_layers():
    settings = method_settings({"name": "wudi", "iter_num": [10, 21], "lr": [1e-4, 3e-4]})
    middle = settings.at("model.layers.1.mlp.up_proj.weight", 0.5)
    assert middle.iter_num == pytest.approx(15.5) and middle.lr == pytest.approx(2e-4)
    deltas = _deltas((12, 8), 3, seed=12)
    merger = build_method(middle, [1.0] * 3, MergeOptions())
    merger.begin(MATRIX, torch.zeros(12, 8, dtype=torch.float64))
    for index, delta in enumerate(deltas):
        merger.update(0, index, delta.clone())
    # 15.5 steps round to 16 (Python rounds half to even)
    assert _relative(merger.finish(), wudi(deltas, 16, 2e-4)[0]) < 1e-10
