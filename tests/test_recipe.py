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
                   {"model": "./code", "parameters": {"weight": 1.0, "density": 0.4}}],
        "parameters": {"lambda": 0.9},
        "dtype": "bfloat16",
    })
    recipe = load_recipe(path)
    assert recipe.base == "./base"
    assert [(s.path, s.weight) for s in recipe.sources] == [("./math", 0.7), ("./code", 1.0)]
    assert (recipe.method.name, recipe.method.density, recipe.method.scale) == ("ties", 0.4, 0.9)
    assert recipe.output.dtype == "bfloat16"


def test_mergekit_dare_linear_and_linear(tmp_path):
    dare = load_recipe(write_recipe(tmp_path / "d.yaml", {
        "merge_method": "dare_linear", "base_model": "b",
        "models": [{"model": "m", "parameters": {"weight": 1, "density": 0.3}}]}))
    assert dare.method.name == "dare" and dare.method.p == pytest.approx(0.7)
    linear = load_recipe(write_recipe(tmp_path / "l.yaml", {
        "merge_method": "linear",
        "models": [{"model": "a", "parameters": {"weight": 1}},
                   {"model": "c", "parameters": {"weight": 3}}]}))
    # a weighted average: base = first model, its delta is zero, the other weighs 3/4
    assert linear.base == "a" and [(s.path, s.weight) for s in linear.sources] == [("c", 0.75)]


@pytest.mark.parametrize("data, message", [
    ({"merge_method": "slerp", "base_model": "b", "models": [{"model": "m"}]},
     "merge_method 'slerp' has no raymerge equivalent"),
    ({"merge_method": "ties", "base_model": "b", "models": [
        {"model": "m", "parameters": {"density": 0.2}},
        {"model": "n", "parameters": {"density": 0.5}}]}, "per-model density differs"),
    ({"merge_method": "ties", "models": [{"model": "m"}]}, "base_model is required"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "m"}], "slices": []},
     "mergekit key 'slices' is not supported"),
])
def test_unsupported_mergekit_recipes_fail_clearly(tmp_path, data, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tmp_path / "mk.yaml", data))


def test_yaml_tags_that_construct_objects_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("base: !!python/object/apply:os.system ['echo hi']\nsources: [a]\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
