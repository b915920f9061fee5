"""mergekit's generalized task arithmetic family (dare_ties, breadcrumbs, breadcrumbs_ties, della,
della_linear), SCE and mergekit's knobs on task_arithmetic, ties and dare, streamed one delta at a
time, equal the dense float64 references written from mergekit's formulas
(tests/reference_mergekit.py); their state does not grow with the number of sources."""

from __future__ import annotations

import pytest
import torch
from reference_mergekit import gta, sce

from raymerge.errors import RecipeError
from raymerge.methods import METHODS, MergeOptions
from raymerge.methods.consensus import SignConsensus
from raymerge.methods.dare import dare_generator, dare_keep_mask
from raymerge.methods.sparsify import (
    keep_between_outliers,
    keep_largest,
    keep_magprune,
    keep_random,
    row_ranks,
    source_generator,
)
from raymerge.recipe import method_settings, recipe_from_dict

NAME = "model.layers.0.mlp.up_proj.weight"


def _stream(name: str, base: torch.Tensor, deltas: torch.Tensor, weights: list[float],
            per_source: dict | None = None, **settings) -> torch.Tensor:
    """The method fed one delta at a time; `per_source`: key -> one value per source."""
    shared = method_settings({"name": name, **settings})
    sources = [shared.model_copy(update={key: values[i] for key, values in
                                         (per_source or {}).items()})
               for i in range(len(weights))]
    method = METHODS[name](shared, weights, MergeOptions(), sources)
    method.begin(NAME, base)
    for pass_index in range(method.passes):
        for index, delta in enumerate(deltas):
            method.update(pass_index, index, delta.clone())
    return method.finish()


def _problem(n: int, shape, seed: int, dtype=torch.float32):
    """Base, n deltas with distinct magnitudes (float32 values, so no rounding ties) and
    weights in [0.5, 1.5)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator).to(dtype)
    deltas = (0.1 * torch.randn((n, *shape), generator=generator)).to(dtype)
    weights = (0.5 + torch.rand(n, generator=generator)).tolist()
    return base, deltas, weights


# (raymerge method, raymerge settings, per-source values, mergekit method, mergekit settings)
CASES = {
    "ties as mergekit": (
        "ties", {"normalize": True, "zero_sum_sign": "positive"}, {"density": [0.3, 0.6, 0.2]},
        "ties", {"normalize": True}),
    "ties as mergekit, rescaled, not normalized": (
        "ties", {"normalize": False, "rescale": True, "zero_sum_sign": "positive"},
        {"density": [0.3, 0.6, 0.2]}, "ties", {"normalize": False, "rescale": "l1"}),
    "task_arithmetic normalized": (
        "task_arithmetic", {"normalize": True}, {}, "task_arithmetic", {"normalize": True}),
    "dare as mergekit dare_linear": (
        "dare", {"rescale": True, "normalize": True, "seed": 3}, {"p": [0.25, 0.5, 0.75]},
        "dare_linear", {"density": [0.75, 0.5, 0.25], "rescale": "l1", "normalize": True,
                        "seed": 3}),
    "dare, DARE paper's rescale": (
        "dare", {"seed": 4}, {"p": [0.5, 0.75, 0.25]},
        "dare_linear", {"density": [0.5, 0.25, 0.75], "rescale": "inverse", "seed": 4}),
    "dare_ties defaults": (
        "dare_ties", {"seed": 5}, {"density": [0.5, 0.25, 0.75]},
        "dare_ties", {"density": [0.5, 0.25, 0.75], "rescale": "l1", "seed": 5}),
    "dare_ties normalized, inverse rescale": (
        "dare_ties", {"seed": 6, "normalize": True, "rescale": "inverse"}, {"density": [0.5] * 3},
        "dare_ties", {"density": 0.5, "normalize": True, "rescale": "inverse", "seed": 6}),
    "breadcrumbs": (
        "breadcrumbs", {"density": 0.5}, {"gamma": [0.1, 0.0, 0.3]},
        "breadcrumbs", {"density": 0.5, "gamma": [0.1, 0.0, 0.3]}),
    "breadcrumbs normalized, rescaled": (
        "breadcrumbs", {"normalize": True, "rescale": True},
        {"density": [0.4, 0.8, 0.6], "gamma": [0.05, 0.1, 0.4]},
        "breadcrumbs", {"density": [0.4, 0.8, 0.6], "gamma": [0.05, 0.1, 0.4],
                        "normalize": True, "rescale": "l1"}),
    "breadcrumbs_ties": (
        "breadcrumbs_ties", {"density": 0.6, "gamma": 0.05}, {},
        "breadcrumbs_ties", {"density": 0.6, "gamma": 0.05}),
    "breadcrumbs_ties count-normalized": (
        "breadcrumbs_ties", {"density": 0.6, "normalize": "count", "zero_sum_sign": "none"}, {},
        "breadcrumbs_ties", {"density": 0.6, "normalize": "count", "zero_sum_sign": "none"}),
    "della defaults": (
        "della", {"seed": 7}, {"density": [0.4, 0.5, 0.6], "epsilon": [0.1, 0.2, 0.3]},
        "della", {"density": [0.4, 0.5, 0.6], "epsilon": [0.1, 0.2, 0.3], "rescale": "l1",
                  "normalize": True, "seed": 7}),
    "della inverse rescale, not normalized": (
        "della", {"seed": 8, "density": 0.5, "rescale": "inverse", "normalize": False}, {},
        "della", {"density": 0.5, "rescale": "inverse", "normalize": False, "seed": 8}),
    "della_linear": (
        "della_linear", {"seed": 9, "density": 0.3, "epsilon": 0.1}, {},
        "della_linear", {"density": 0.3, "epsilon": 0.1, "rescale": "l1", "seed": 9}),
    "della_linear normalized, unscaled": (
        "della_linear", {"seed": 9, "density": 0.7, "normalize": True, "rescale": False}, {},
        "della_linear", {"density": 0.7, "normalize": True, "seed": 9}),
}


@pytest.mark.parametrize("shape", [(24, 20), (37,), (3, 5, 4)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_method_equals_mergekit_dense_reference(case, shape):
    method, settings, per_source, reference_method, reference_settings = CASES[case]
    base, deltas, weights = _problem(3, shape, seed=len(case) + len(shape))
    merged = _stream(method, base, deltas, weights, per_source, **settings)
    same_keys = {key: values for key, values in per_source.items() if key != "p"}  # p = 1 − d
    expected = gta(reference_method, deltas.double(), weights, name=NAME,
                   **{**same_keys, **reference_settings})
    assert merged.dtype == torch.float32 and merged.shape == base.shape
    torch.testing.assert_close(merged.double(), expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("n", [2, 7])
def test_float64_streaming_matches_to_float64_precision(n):
    base, deltas, weights = _problem(n, (16, 12), seed=n, dtype=torch.float64)
    for method, settings, expected in [
        ("della", {"density": 0.5, "seed": 1},
         gta("della", deltas, weights, name=NAME, density=0.5, rescale="l1", normalize=True,
             seed=1)),
        ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1, "rescale": "l1"},
         gta("breadcrumbs_ties", deltas, weights, density=0.5, gamma=0.1, rescale="l1")),
        ("sce", {"select_topk": 0.4}, sce(deltas, 0.4)),
    ]:
        merged = _stream(method, base, deltas, [1.0] * n if method == "sce" else weights,
                         **settings)
        torch.testing.assert_close(merged, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("scale", [1.0, 1e-3])  # 1e-3: Σ s_i < 1e-6, mergekit's uniform shares
@pytest.mark.parametrize("n", [2, 5])
def test_sce_equals_mergekit_dense_reference(select_topk, scale, n):
    base, deltas, _ = _problem(n, (20, 18), seed=n + int(10 * select_topk))
    deltas = deltas * scale
    merged = _stream("sce", base, deltas, [1.0] * n, select_topk=select_topk)
    expected = sce(deltas.double(), select_topk)
    torch.testing.assert_close(merged.double(), expected, rtol=2e-5, atol=1e-6 * scale)


def test_sce_reads_the_sources_once_per_step_it_needs():
    passes = {}
    for topk in (1.0, 0.5, 0.0):
        method = METHODS["sce"](method_settings({"name": "sce", "select_topk": topk}), [1.0])
        method.begin(NAME, torch.zeros(4))
        passes[topk] = method.passes
    assert passes == {1.0: 2, 0.5: 3, 0.0: 0}  # no selection; select, calculate, erase; none
    merged = _stream("sce", torch.zeros(4), torch.ones(2, 4), [1.0, 1.0], select_topk=0.0)
    assert merged.tolist() == [0.0] * 4


def test_magnitude_keeps_top_k_with_mergekit_counts():
    values = torch.tensor([0.5, -3.0, 2.0, 0.1, -0.2, 1.0, 0.05, -0.7, 4.0, 0.3])
    kept = values.clone()
    keep_largest(kept, 0.25)  # k = int(2.5) = 2
    assert kept.tolist() == [0, -3.0, 0, 0, 0, 0, 0, 0, 4.0, 0]
    tiny, none, every = values.clone(), values.clone(), values.clone()
    keep_largest(tiny, 0.01)  # k = max(1, 0)
    keep_largest(none, 0.0)
    keep_largest(every, 1.0)
    assert tiny.count_nonzero() == 1 and none.count_nonzero() == 0 and torch.equal(every, values)


def test_breadcrumbs_drops_outliers_then_keeps_the_density_fraction():
    magnitudes = torch.arange(1.0, 11.0)  # 1..10
    signs = torch.tensor([1.0, -1.0] * 5)
    values = (magnitudes * signs)[torch.randperm(10, generator=torch.Generator().manual_seed(0))]

    def kept(density, gamma):
        result = values.clone()
        keep_between_outliers(result, density, gamma)
        return sorted(result[result != 0].abs().tolist())

    assert kept(0.5, 0.2) == [4, 5, 6, 7, 8]  # drop the 2 largest and the 3 smallest
    assert kept(0.3, 0.0) == [8, 9, 10]  # gamma 0: plain top-k
    assert kept(0.05, 0.0) == []  # int(0.5) = 0 kept: no max(1, ...) as in mergekit
    assert kept(0.9, 0.2) == [1, 2, 3, 4, 5, 6, 7, 8, 9]  # 9 + 2 > 10: only 1 outlier dropped
    assert kept(1.0, 0.5) == list(range(1, 11))  # density 1 keeps everything


def test_random_drops_keep_the_density_fraction_with_dare_masks():
    shape = torch.Size([400, 500])
    ones = torch.ones(shape)
    keep_random(ones, 0.3, source_generator(0, NAME, 2))
    assert abs(ones.mean().item() - 0.3) < 0.005
    dare_mask = dare_keep_mask(shape, 0.7, dare_generator(0, NAME, 2))
    assert torch.equal(ones.bool(), dare_mask)  # dare_ties(density d) draws dare(p = 1 − d)
    untouched = torch.ones(shape)
    keep_random(untouched, 1.0, source_generator(0, NAME, 2))
    assert untouched.all()


def test_magprune_ranks_magnitudes_in_each_row_ties_by_position():
    rows = torch.tensor([[0.5, -0.5, 0.1, 0.0, -0.0, 2.0], [3.0, 1.0, -2.0, 0.5, 0.25, 4.0]])
    expected = [[3, 4, 2, 0, 1, 5], [4, 2, 3, 1, 0, 5]]
    assert row_ranks(rows).tolist() == expected == row_ranks(rows.double()).tolist()


def test_magprune_keeps_large_entries_more_often_and_inverse_rescale_is_unbiased():
    rows, length = 400, 250
    magnitudes = torch.arange(1, length + 1, dtype=torch.float32).repeat(rows, 1)
    values = magnitudes[:, torch.randperm(length, generator=torch.Generator().manual_seed(1))]
    density, epsilon = 0.4, 0.2
    kept = values.clone()
    keep_magprune(kept, density, epsilon, source_generator(3, NAME, 0), inverse_rescale=False)
    survived = kept != 0
    assert abs(survived.float().mean().item() - density) < 0.005
    by_rank = survived.float().gather(1, values.argsort(dim=1)).mean(0)  # smallest first
    assert abs(by_rank[:25].mean().item() - (density - 0.9 * epsilon)) < 0.02
    assert abs(by_rank[-25:].mean().item() - (density + 0.9 * epsilon)) < 0.02
    rescaled = values.clone()
    keep_magprune(rescaled, density, epsilon, source_generator(3, NAME, 0), inverse_rescale=True)
    assert torch.equal(rescaled != 0, survived)  # the same draws
    assert abs(rescaled.sum().item() / values.sum().item() - 1.0) < 0.01
    column = torch.full((20_000, 1), 2.0)  # rows of one entry: probability = density
    keep_magprune(column, density, epsilon, source_generator(3, NAME, 1), inverse_rescale=False)
    assert abs((column != 0).float().mean().item() - density) < 0.015
    full, empty = values.clone(), values.clone()
    keep_magprune(full, 1.0, epsilon, source_generator(3, NAME, 0), inverse_rescale=True)
    keep_magprune(empty, 0.0, epsilon, source_generator(3, NAME, 0), inverse_rescale=True)
    assert torch.equal(full, values) and empty.count_nonzero() == 0


@pytest.mark.parametrize("method", ["dare_ties", "della", "della_linear"])
def test_random_methods_are_reproducible_and_differ_across_seeds(method):
    base, deltas, weights = _problem(3, (30, 20), seed=11)
    torch.manual_seed(0)  # the global generator plays no part: only (seed, tensor, source)
    first = _stream(method, base, deltas, weights, density=0.5, seed=1)
    torch.manual_seed(1)
    again = _stream(method, base, deltas, weights, density=0.5, seed=1)
    other = _stream(method, base, deltas, weights, density=0.5, seed=2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert METHODS[method].random


def test_l1_rescale_restores_each_source_norm():
    base, deltas, _ = _problem(1, (40, 30), seed=2)
    for method, settings in [("breadcrumbs", {"density": 0.3, "gamma": 0.05}),
                             ("della_linear", {"density": 0.4, "epsilon": 0.1}),
                             ("dare", {"p": 0.6}), ("dare_ties", {"density": 0.4})]:
        merged = _stream(method, base, deltas, [1.0], rescale="l1", **settings)
        assert (merged != 0).float().mean() < 0.7
        assert merged.abs().sum().item() == pytest.approx(deltas[0].abs().sum().item(), rel=1e-5)


def test_zero_sum_sign_decides_exact_cancellations():
    opposed = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 1.0, 0.0]])
    paper = _stream("ties", torch.zeros(3), opposed, [1.0, 1.0], density=1.0)
    mergekit = _stream("ties", torch.zeros(3), opposed, [1.0, 1.0], density=1.0,
                       zero_sum_sign="positive", normalize="weights")
    assert paper.tolist() == [0.0, 1.5, 0.0]  # sgn(0) = 0: nothing agrees
    assert mergekit.tolist() == [1.0, 1.5, 0.0]  # Σ ≥ 0 elects +: the positive entry is kept


def test_consensus_divides_by_the_agreeing_weights():
    contributions = torch.tensor([[2.0, -1.0], [1.0, 3.0], [-0.5, 2.0]])
    weights = [2.0, 0.5, 1.0]  # contributions are weighted already: w_i in the divisor only
    for normalize, expected in [("weights", [3.0 / 2.5, 5.0 / 1.5]), ("count", [1.5, 2.5]),
                                ("none", [3.0, 5.0])]:
        consensus = SignConsensus(torch.zeros(2), normalize, "positive", weights)
        for contribution, weight in zip(contributions, weights):
            consensus.add(contribution.clone(), weight)
        assert consensus.result().tolist() == pytest.approx(expected)


def _tensors_held(value, seen=None) -> list[torch.Tensor]:
    """Every tensor reachable from a method object's attributes (lists, dicts, helpers)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors_held(item, seen)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors_held(item, seen)]
    if hasattr(value, "__dict__") and type(value).__module__.startswith("raymerge.methods"):
        return [t for item in vars(value).values() for t in _tensors_held(item, seen)]
    return []


NEW_METHODS = {"dare_ties": {"density": 0.5}, "breadcrumbs": {"density": 0.5},
               "breadcrumbs_ties": {"density": 0.5}, "della": {"density": 0.5},
               "della_linear": {"density": 0.5}, "sce": {"select_topk": 0.5},
               "ties": {"normalize": "weights"}, "dare": {"normalize": True}}


@pytest.mark.parametrize("method", sorted(NEW_METHODS))
def test_state_is_a_fixed_number_of_tensor_sized_buffers_whatever_n(method):
    shape = (12, 10)
    held = {}
    for n in (2, 9):
        base, deltas, weights = _problem(n, shape, seed=n)
        weights = [1.0] * n if method == "sce" else weights
        instance = METHODS[method](method_settings({"name": method, **NEW_METHODS[method]}),
                                   weights)
        instance.begin(NAME, base)
        most = 0
        for pass_index in range(instance.passes):
            for index, delta in enumerate(deltas):
                instance.update(pass_index, index, delta.clone())
                tensors = [t for t in _tensors_held(instance) if t is not base]
                assert all(t.shape == base.shape or t.numel() == 1 for t in tensors), method
                most = max(most, sum(t.numel() * t.element_size() for t in tensors))
        held[n] = most
        assert instance.finish().shape == base.shape
    # the same bytes for 2 and 9 sources, within what the method declares to the planner
    one_tensor = base.numel() * base.element_size()
    assert held[2] == held[9] <= METHODS[method].state_tensors * one_tensor, held


def test_della_refuses_keep_probabilities_outside_0_1():
    with pytest.raises(ValueError, match=r"density 0.1 ± epsilon 0.15 must stay inside \(0, 1\)"):
        method_settings({"name": "della", "density": 0.1})
    with pytest.raises(RecipeError,
                       match="sources.0.parameters.epsilon: density 0.5 ± epsilon 0.6"):
        recipe_from_dict({"base": "b", "method": {"name": "della_linear", "density": 0.5},
                          "sources": [{"path": "s", "parameters": {"epsilon": 0.6}}]})
    method_settings({"name": "della", "density": 1.0, "epsilon": 0.5})  # keeps all: no draw
    graded = method_settings({"name": "della", "density": [0.5, 0.9], "epsilon": 0.15})
    METHODS["della"].check(graded.at(NAME, 0.0), {NAME: (4, 4)}, 2, MergeOptions())
    with pytest.raises(RecipeError, match=f"method della: tensor {NAME}: density 0.9"):
        METHODS["della"].check(graded.at(NAME, 1.0), {NAME: (4, 4)}, 2, MergeOptions())
    sources = [graded.at(NAME, 1.0)]
    method = METHODS["della"](graded.at(NAME, 0.0), [1.0], MergeOptions(), sources)
    method.begin(NAME, torch.zeros(4, 4))
    with pytest.raises(RecipeError, match=f"sources.0, tensor {NAME}"):
        method.update(0, 0, torch.ones(4, 4))


def test_mergekit_booleans_map_and_keys_without_an_effect_are_refused():
    assert method_settings({"name": "ties", "rescale": True}).rescale == "l1"
    assert method_settings({"name": "ties", "normalize": True}).normalize == "weights"
    assert method_settings({"name": "della", "normalize": False}).normalize == "none"
    assert method_settings({"name": "dare", "rescale": False}).rescale == "none"
    assert method_settings({"name": "dare"}).rescale == "inverse"
    assert method_settings({"name": "della_linear"}).normalize is False
    with pytest.raises(ValueError, match="rescale"):  # no keep probability to divide by
        method_settings({"name": "breadcrumbs", "rescale": "inverse"})
    for key in ("int8_mask", "lambda"):
        with pytest.raises(ValueError, match=f"dare_ties does not take '{key}'"):
            method_settings({"name": "dare_ties", key: True})
    with pytest.raises(ValueError, match="select_topk"):
        method_settings({"name": "sce", "select_topk": 1.5})
    with pytest.raises(RecipeError, match="sources.1.weight: method sce does not weigh"):
        recipe_from_dict({"base": "b", "method": {"name": "sce"},
                          "sources": ["s0", {"path": "s1", "weight": 0.5}]})
