"""Recipe loading: our YAML, mergekit's YAML, sizes, and errors that point at the key."""

from __future__ import annotations

import pytest
from helpers import write_recipe

from raymerge.errors import RecipeError
from raymerge.recipe import load_recipe, recipe_from_dict
from raymerge.sizes import parse_size


def test_string_sources_defaults_and_sizes():
    recipe = recipe_from_dict({"base": "b", "sources": ["x", {"path": "y", "weight": 2}],
                               "output": {"shard_size": "500MiB"}, "runtime": {"memory": "4GB"}})
    assert [(s.path, s.weight) for s in recipe.sources] == [("x", 1.0), ("y", 2.0)]
    assert recipe.method.name == "task_arithmetic" and recipe.method.scale == 1.0
    assert recipe.output.shard_size == 500 * 2**20 and recipe.runtime.memory == 4 * 10**9
    assert recipe.exclude == ["embed_tokens", "lm_head", "wte", "wpe", "embeddings"]
    assert recipe_from_dict(recipe.model_dump()) == recipe  # the resolved recipe reloads


def test_parse_size_rejects_nonsense():
    assert parse_size("2GB") == 2 * 10**9 and parse_size(1024) == 1024
    for bad in ("-1GB", "0", "12 parsecs", True):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_mergekit_ties_maps_onto_the_recipe(tmp_path):
    path = write_recipe(tmp_path / "mk.yaml", {
        "merge_method": "ties",
        "base_model": "./base",
        "models": [{"model": "./base"},
                   {"model": "./math", "parameters": {"weight": 0.7, "density": 0.4}},
                   {"model": "./code", "parameters": {"weight": 1.0, "density": 0.6}}],
        "parameters": {"lambda": 0.9},
        "dtype": "bfloat16",
    })
    recipe = load_recipe(path)
    assert recipe.base == "./base"
    assert [(s.path, s.weight, s.parameters) for s in recipe.sources] == [
        ("./math", 0.7, {"density": 0.4}), ("./code", 1.0, {"density": 0.6})]
    method = recipe.method  # mergekit's ties: its defaults written out where raymerge's differ
    assert (method.name, method.scale, method.density, method.normalize, method.rescale,
            method.zero_sum_sign) == ("ties", 0.9, 1.0, "weights", "none", "positive")
    assert recipe.output.dtype == "bfloat16"


def test_mergekit_dare_linear_and_linear(tmp_path):
    dare = load_recipe(write_recipe(tmp_path / "d.yaml", {
        "merge_method": "dare_linear", "base_model": "b",
        "models": [{"model": "m", "parameters": {"weight": 1, "density": 0.3}}]}))
    assert dare.method.name == "dare" and dare.method.rescale == "l1"  # mergekit's rescale: true
    assert dare.sources[0].parameters["p"] == pytest.approx(0.7)
    linear = load_recipe(write_recipe(tmp_path / "l.yaml", {
        "merge_method": "linear",
        "models": [{"model": "a", "parameters": {"weight": 1}},
                   {"model": "c", "parameters": {"weight": 3}}]}))
    # a weighted average: base = first model, its delta is zero, the other weighs 3/4
    assert linear.base == "a" and [(s.path, s.weight) for s in linear.sources] == [("c", 0.75)]


def test_yaml_tags_that_construct_objects_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("base: !!python/object/apply:os.system ['echo hi']\nsources: [a]\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
