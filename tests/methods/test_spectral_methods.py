"""Spectral methods as pure functions: streaming AXIS equals the batch definition, and the
methods refuse what their definitions cannot do."""

from __future__ import annotations

import pytest
import torch
from helpers import published, write_recipe
from reference_spectral import axis as dense_axis

from raymerge.cli import main
from raymerge.errors import RecipeError
from raymerge.methods import MergeOptions, build_method
from raymerge.recipe import method_settings
from raymerge.spectral.svd import exact_svd
from raymerge.synthetic import llama_config, write_base, write_finetune

MATRIX = "model.layers.0.mlp.up_proj.weight"


def _stream(method, base, deltas, weights, **settings):
    merger = build_method(method_settings({"name": method, **settings}), weights,
                          MergeOptions(svd="exact"))
    merger.begin(MATRIX, base)
    for pass_index in range(merger.passes):
        for index, delta in enumerate(deltas):
            merger.update(pass_index, index, delta.clone())
    return merger.finish(), merger.report


@pytest.mark.parametrize("n, keep", [(2, 5), (4, 17), (7, 40), (9, 3)])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (30, 30)])
def test_streaming_axis_equals_the_batch_pool(n, keep, shape):
    generator = torch.Generator().manual_seed(n * keep)
    base = torch.zeros(shape, dtype=torch.float64)
    deltas = [torch.randn(shape, generator=generator, dtype=torch.float64) * (1 + i)
              for i in range(n)]
    weights = [1.0] * n
    streamed, report = _stream("axis", base, deltas, weights, k=keep)
    # batch definition: every component of every source in one pool, the K largest σ kept
    torch.testing.assert_close(streamed, dense_axis(deltas, keep), rtol=1e-12, atol=1e-12)
    U, S, V = report.factors
    assert S.numel() == min(keep, *shape) and bool((S[:-1] >= S[1:]).all())  # rank ≤ K
    torch.testing.assert_close((U * S) @ V.T, streamed, rtol=1e-10, atol=1e-12)
    assert sum(report.stats["axis_selected_per_source"]) == keep
    # the largest source dominates the pool
    counts = report.stats["axis_selected_per_source"]
    assert counts[-1] == max(counts)


def test_axis_pool_never_exceeds_k():
    base = torch.zeros(50, 50)
    merger = build_method(method_settings({"name": "axis", "k": 6}), [1.0] * 8,
                          MergeOptions(svd="exact"))
    merger.begin(MATRIX, base)
    for index in range(8):
        merger.update(0, index, torch.randn(50, 50))
        assert merger.pool_U.shape == (50, 6) and merger.pool_V.shape == (50, 6)


def test_iso_c_flattens_the_spectrum():
    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(30, 20, generator=generator, dtype=torch.float64) for _ in range(3)]
    merged, _ = _stream("iso_c", torch.zeros(30, 20, dtype=torch.float64), deltas, [1.0] * 3)
    singular_values = exact_svd(merged).S
    expected = exact_svd(sum(deltas)).S.mean()
    torch.testing.assert_close(singular_values, expected.expand(20))


def test_non_matrices_and_excluded_tensors_are_the_weighted_mean():
    deltas = [torch.full((6,), 2.0), torch.full((6,), 4.0)]
    for method in ("axis", "tsv", "iso_c", "iso_cts"):
        merger = build_method(method_settings({"name": method}), [1.0, 0.5], MergeOptions())
        merger.begin("model.norm.weight", torch.zeros(6))
        for index, delta in enumerate(deltas):
            merger.update(0, index, delta.clone())
        assert merger.passes == 1 and merger.finish().tolist() == [2.0] * 6  # (2 + 0.5·4)/2
        merger.begin("model.embed_tokens.weight", torch.zeros(3, 2))
        merger.update(0, 0, torch.ones(3, 2))
        merger.update(0, 1, torch.ones(3, 2))
        assert merger.finish().tolist() == [[0.75] * 2] * 3


def test_axis_k_larger_than_all_components_is_refused_before_work(float32_family, tmp_path,
                                                                  capsys):
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(float32_family["base"]), "sources": [str(p) for p in
                                                         float32_family["sources"][:2]],
        "method": {"name": "axis", "k": 40}, "output": {"path": str(out)}})
    assert main(["merge", str(recipe)]) == 2
    error = capsys.readouterr().err
    assert "K = 40 is larger than the 2 × 16 components of tensor" in error and "lower k" in error
    assert published(out) == []


def test_tsv_with_more_sources_than_the_rank_is_refused(tmp_path, capsys):
    config = llama_config(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, vocab_size=16)
    base = write_base(tmp_path / "base", config)
    sources = [write_finetune(base, tmp_path / f"ft-{i}", seed=i) for i in range(5)]
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(base), "sources": [str(p) for p in sources], "method": {"name": "tsv"},
        "output": {"path": str(out)}})
    assert main(["merge", str(recipe)]) == 2
    error = capsys.readouterr().err
    assert "method tsv: tensor model.layers.0.self_attn.k_proj.weight has rank 4, fewer than " \
           "the 5 sources" in error
    assert published(out) == []


def test_k_out_of_range_is_a_recipe_error():
    for bad in (0, -3, 1.5):
        with pytest.raises(ValueError):
            method_settings({"name": "axis", "k": bad})
    with pytest.raises(RecipeError):
        from raymerge.methods.axis import components_to_keep

        components_to_keep(0, 10)
