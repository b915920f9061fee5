"""ACE-Merging streamed, against a dense float64 transcription of the official `ace_merging`
(tests/reference_ace.py): both branches, LoRA sources, expert stacks, SVC after it.

Tolerances: float64 compute 1e-10 relative; float32 compute (LU solve) against the float64
reference (explicit inverse) 1e-5 relative, the tolerance of the other methods' float32 tests."""

from __future__ import annotations

import pytest
import torch
from reference_ace import ace
from reference_spectral import svc

from raymerge.errors import RecipeError
from raymerge.methods import MergeOptions, build_method
from raymerge.methods.ace import heterogeneity
from raymerge.recipe import method_settings, recipe_from_dict

MATRIX = "model.layers.0.mlp.up_proj.weight"


def _deltas(shape, scales, seed, dtype=torch.float64):
    """Low-rank-plus-noise task matrices with a non-zero mean row (so centring matters), one per
    scale: the scales set the traces, and with them the branch."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = shape

    def one(scale):
        low_rank = (torch.randn(rows, 3, generator=generator, dtype=torch.float64)
                    @ torch.randn(3, cols, generator=generator, dtype=torch.float64))
        noise = 0.3 * torch.randn(rows, cols, generator=generator, dtype=torch.float64)
        offset = torch.randn(1, cols, generator=generator, dtype=torch.float64)
        return ((low_rank + noise + offset) * scale).to(dtype)

    return [one(scale) for scale in scales]


# On these shapes (unweighted): traces 2.4e-3 to 8.5e-3, homogeneous (γ ≤ 0.009); traces
# 3.6e-4 to 45, heterogeneous (γ 7.8 to 13)
HOMOGENEOUS = [0.0010, 0.0012, 0.0008, 0.0011]
HETEROGENEOUS = [0.0003, 0.03, 0.1, 0.002]


def _stream(deltas, weights=None, name=MATRIX, svc_alpha=None, factored=None, **settings):
    weights = weights or [1.0] * len(deltas)
    merger = build_method(method_settings({"name": "ace", **settings}), weights, MergeOptions(),
                          svc_alpha, tensor=(name, tuple(deltas[0].shape)))
    merger.begin(name, torch.zeros_like(deltas[0]))
    for pass_index in range(merger.passes):
        for index, delta in enumerate(deltas):
            if factored is not None:
                merger.update_factored(pass_index, index, *factored[index])
            else:
                merger.update(pass_index, index, delta.clone())
    return merger.finish(), merger.report


def _relative(actual, expected) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (30, 30)])
@pytest.mark.parametrize("scales, heterogeneous", [(HOMOGENEOUS, False), (HETEROGENEOUS, True)])
def test_ace_equals_the_official_code_in_float64(shape, scales, heterogeneous):
    deltas = _deltas(shape, scales, seed=len(shape) + shape[0])
    weights = [1.0, 0.5, 1.5, 0.75]
    merged, report = _stream(deltas, weights)
    weighted = [w * d for w, d in zip(weights, deltas)]
    expected, branch = ace(weighted)
    assert branch is heterogeneous and report.stats["ace_heterogeneous"] == int(heterogeneous)
    traces = [float(d.square().sum()) for d in weighted]
    assert report.stats["ace_gamma"] == pytest.approx(heterogeneity(traces), rel=1e-12)
    assert _relative(merged, expected) < 1e-10
    # not a trivial merge: far from the mean and from the sum of the task matrices
    assert _relative(sum(weighted) / 4, expected) > 1e-2
    assert _relative(sum(weighted), expected) > 1e-2


def test_the_branch_switches_with_the_spread_of_the_traces():
    assert heterogeneity([0.010, 0.012, 0.008, 0.011]) < 0.3
    assert heterogeneity([1e-6, 1e-3, 1e-1, 1e-4]) > 0.3
    # γ is not scale-free: traces either side of 1 (mean log ≈ 0) are heterogeneous at a
    # spread of 4×, the same spread far from 1 is not (docs/notes/ace.md)
    assert heterogeneity([0.5, 2.0]) > 0.3 > heterogeneity([0.005, 0.02])
    assert heterogeneity([0.5]) == 0.0  # one source: homogeneous (the official code: NaN)


@pytest.mark.parametrize("scales", [HOMOGENEOUS, HETEROGENEOUS])
def test_ace_in_float32_with_a_solve_is_within_tolerance_of_the_inverse(scales):
    deltas = _deltas((48, 32), scales, seed=5)
    merged, report = _stream([d.float() for d in deltas])
    expected, heterogeneous = ace(deltas)
    assert merged.dtype == torch.float32
    assert report.stats["ace_heterogeneous"] == int(heterogeneous) == int(scales is HETEROGENEOUS)
    assert _relative(merged, expected) < 1e-5


@pytest.mark.parametrize("eps, k_frac", [(1e-3, 0.1), (1e-1, 1.0)])
def test_ace_settings_reach_the_solve_and_the_refinement(eps, k_frac):
    deltas = _deltas((24, 20), HETEROGENEOUS, seed=9)
    merged, _ = _stream(deltas, eps=eps, k_frac=k_frac)
    expected = ace(deltas, eps=eps, k_frac=k_frac)[0]
    assert _relative(merged, expected) < 1e-10
    assert _relative(ace(deltas)[0], expected) > 1e-3  # the defaults give another merge


def test_a_refinement_rank_of_zero_adds_nothing():
    """min(m, n) = 3 and k_frac 0.3: ⌊0.9⌋ = 0 (the official code: mean of nothing, NaN)."""
    deltas = _deltas((3, 5), HETEROGENEOUS, seed=2)
    merged, report = _stream(deltas)
    assert report.stats["ace_heterogeneous"] == 1 and bool(torch.isfinite(merged).all())
    assert _relative(merged, ace(deltas)[0]) < 1e-10


@pytest.mark.parametrize("scales", [HOMOGENEOUS, HETEROGENEOUS])
def test_ace_lora_factors_give_the_dense_result(scales):
    generator = torch.Generator().manual_seed(4)
    factors = [(torch.randn(20, 3, generator=generator, dtype=torch.float64) * scale,
                torch.randn(14, 3, generator=generator, dtype=torch.float64))
               for scale in scales]
    dense = [left @ right.T for left, right in factors]
    merged, report = _stream(dense, [1.0, 1.1, 0.9, 1.0],
                             factored=factors)
    expected, branch = ace([w * d for w, d in zip([1.0, 1.1, 0.9, 1.0], dense)])
    assert report.stats["ace_heterogeneous"] == int(branch) == int(scales is HETEROGENEOUS)
    assert _relative(merged, expected) < 1e-10


@pytest.mark.parametrize("calibrate", [False, True])
def test_each_expert_slice_is_merged_as_the_official_code_merges_a_matrix(calibrate):
    stack = "model.layers.0.mlp.experts.gate_up_proj"
    slices = [_deltas((12, 10), HETEROGENEOUS if expert else HOMOGENEOUS, seed=expert)
              for expert in range(3)]
    deltas = [torch.stack([slices[e][i] for e in range(3)]) for i in range(4)]
    merged, report = _stream(deltas, name=stack, svc_alpha=0.25 if calibrate else None)
    for expert in range(3):
        expected = ace(slices[expert])[0]
        if calibrate:
            expected = svc(expected, slices[expert], 0.25)
        assert _relative(merged[expert], expected) < 1e-10
    if not calibrate:
        assert [report.parts[f"[{e}]"]["ace_heterogeneous"] for e in range(3)] == [0, 1, 1]


def test_svc_after_ace_calibrates_its_merge_with_alpha_auto_one_over_n():
    recipe = recipe_from_dict({"base": "b", "sources": ["s1", "s2", "s3", "s4"],
                               "method": {"name": "ace"},
                               "calibrate": {"svc": {"alpha": "auto"}}})
    assert recipe.svc_alpha() == 0.25
    deltas = _deltas((30, 20), HETEROGENEOUS, seed=8)
    merged, report = _stream(deltas, svc_alpha=0.25, scale=2.0)
    assert _relative(merged, svc(2.0 * ace(deltas)[0], deltas, 0.25)) < 1e-10
    assert "svc_gamma_median" in report.stats and "ace_gamma" in report.stats


def test_non_matrices_and_excluded_tensors_are_the_weighted_mean():
    merged, report = _stream([torch.full((6,), 2.0), torch.full((6,), 4.0)], [1.0, 0.5],
                             name="model.norm.weight")
    assert merged.tolist() == [2.0] * 6 and report.stats == {}
    embedding = _deltas((8, 4), [1.0, 1.0], seed=0)
    merged, _ = _stream(embedding, [1.0, 0.5], name="model.embed_tokens.weight")
    torch.testing.assert_close(merged, (embedding[0] + 0.5 * embedding[1]) / 2)


@pytest.mark.parametrize("block, message", [
    ({"name": "ace", "eps": 0}, "eps"),
    ({"name": "ace", "k_frac": 1.5}, "k_frac"),
    ({"name": "ace", "k_frac": 0}, "k_frac"),
    ({"name": "ace", "density": 0.2}, "density"),
])
def test_out_of_range_or_foreign_keys_are_recipe_errors(block, message):
    with pytest.raises((RecipeError, ValueError), match=message):
        recipe_from_dict({"base": "b", "sources": ["s1", "s2"], "method": block})
