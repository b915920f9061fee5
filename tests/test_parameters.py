"""Parameters that vary: gradients over the layers, filters on tensor names and per-source
values, resolved as mergekit resolves them, shown by `raymerge plan`, and merged exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_merged_close, load_tensors, write_recipe
from reference import deltas_of, ties

from raymerge.cli import main
from raymerge.recipe import recipe_from_dict
from raymerge.roles import layer_positions
from raymerge.settings import evaluate, settings_for_tensor


def test_gradients_interpolate_and_filters_match_by_substring_as_mergekit():
    recipe = recipe_from_dict({"base": "b", "sources": ["s"], "method": {
        "name": "ties", "density": [0.2, 0.6, 1.0]}})
    gradient = recipe.method.density
    assert [evaluate(gradient, "x", t) for t in (0.0, 0.25, 0.5, 1.0)] == \
        pytest.approx([0.2, 0.4, 0.6, 1.0])
    assert evaluate([True, False], "x", 0.4) is True and evaluate([True, False], "x", 1.0) is False
    filters = recipe_from_dict({"base": "b", "sources": ["s"], "method": {
        "name": "ties", "density": [{"filter": "mlp", "value": [0.1, 0.3]},
                                    {"filter": "self_attn", "value": 0.7}]}}).method.density
    assert evaluate(filters, "model.layers.3.mlp.up_proj.weight", 0.5) == pytest.approx(0.2)
    assert evaluate(filters, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.7
    assert evaluate(filters, "model.norm.weight", 0.0) is None  # no match: the next scope


def test_a_source_value_wins_then_the_method_block_then_the_default():
    recipe = recipe_from_dict({"base": "b", "sources": [
        "s0", {"path": "s1", "weight": [{"filter": "mlp", "value": 0.5}],
               "parameters": {"density": [{"filter": "mlp", "value": 0.9}]}}],
        "method": {"name": "ties", "density": [{"filter": "attn", "value": 0.4}]}})
    sources = recipe.sources

    def at(name):
        return settings_for_tensor(recipe.method, [s.parameters for s in sources],
                                   [s.weight for s in sources], name, 0.0)

    shared, per_source, weights = at("model.layers.0.mlp.up_proj.weight")
    assert shared.density == 0.2 and [s.density for s in per_source] == [0.2, 0.9]
    assert weights == [1.0, 0.5]
    shared, per_source, weights = at("model.layers.0.self_attn.q_proj.weight")
    assert shared.density == 0.4 and [s.density for s in per_source] == [0.4, 0.4]
    assert weights == [1.0, 1.0]  # no weight filter matches: the default weight


def test_layer_positions_run_from_0_to_1_per_stack_of_blocks():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + [
        "model.embed_tokens.weight", "vision_tower.blocks.0.attn.weight", "lm_head.weight"]
    positions = layer_positions(names)
    assert [positions[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(5)] == \
        [0.0, 0.25, 0.5, 0.75, 1.0]
    assert positions["model.embed_tokens.weight"] == positions["lm_head.weight"] == 0.0
    assert positions["vision_tower.blocks.0.attn.weight"] == 1.0  # one block: t = 1 (mergekit)


def test_gradient_filter_and_per_source_parameters_merge_exactly(ray_cluster, float32_family,
                                                                tmp_path, capsys):
    family = float32_family
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(family["base"]),
        "sources": [{"path": str(family["sources"][0]),
                     "weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]},
                    str(family["sources"][1]),
                    {"path": str(family["sources"][2]), "parameters": {"density": 1.0}}],
        "method": {"name": "ties", "density": [0.2, 0.8], "scale": 0.9},
        "output": {"path": str(out)}})
    assert main(["plan", str(recipe)]) == 0
    printed = capsys.readouterr().out
    layer_rows = {line.split()[0]: line for line in printed.splitlines()
                  if line.startswith("model.layers.")}
    assert "density [0.2, 0.2, 1]" in layer_rows["model.layers.0"]
    assert "density [0.5, 0.5, 1]" in layer_rows["model.layers.1"]
    assert "weight [0.5, 1, 1] to [1, 1, 1]" in layer_rows["model.layers.2"]

    assert main(["merge", str(recipe), "--no-progress"]) == 0
    base = load_tensors(family["base"])
    sources = [load_tensors(p) for p in family["sources"][:3]]
    merged = load_tensors(out)
    for name, base_tensor in base.items():
        t = {"model.layers.0.": 0.0, "model.layers.1.": 0.5, "model.layers.2.": 1.0}.get(
            name[:15], 0.0)
        density = 0.2 + 0.6 * t
        weights = [0.5 if "mlp" in name else 1.0, 1.0, 1.0]
        expected = base_tensor.double() + 0.9 * ties(
            deltas_of(base_tensor, [s[name] for s in sources]), weights, [density, density, 1.0])
        assert_merged_close(merged[name], expected.to(base_tensor.dtype), name)
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"],
                           merged["model.layers.2.mlp.up_proj.weight"])
