"""mergekit 0.1.5 YAML files as users write them: every method raymerge maps merges through
`raymerge merge` to what mergekit's definition gives (dense float64 references of mergekit's
formulas); per-model, gradient and filter parameters carry over; every mergekit key either has an
effect on the recipe or is a one-line error."""

from __future__ import annotations

import copy
import os

import pytest
import yaml
from helpers import load_tensors, write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import deltas_of
from reference_mergekit import gta, sce
from reference_mergekit_geometric import reference_geometric

from raymerge.cli import main
from raymerge.errors import RecipeError
from raymerge.mergekit import MERGEKIT_METHODS, NO_EFFECT, TOP_LEVEL
from raymerge.recipe import load_recipe, recipe_from_dict
from raymerge.roles import layer_positions
from raymerge.settings import evaluate

WEIGHTS = [1.0, 0.5, 0.75, 1.25]
GRADIENT = [0.3, 0.7]  # over the layers
FILTERED = [{"filter": "mlp", "value": 0.4}, {"value": 0.8}]

# merge_method -> (number of models besides the base, shared parameters, per-model parameters
# as lists over the models)
GTA_CASES = {
    "task_arithmetic": (4, {"lambda": 0.9}, {}),
    "ties": (4, {"normalize": True}, {"density": [GRADIENT, 0.5, FILTERED, 0.9]}),
    "dare_linear": (4, {}, {"density": [0.5, 0.7, 0.9, 0.6]}),
    "dare_ties": (4, {"lambda": 0.8}, {"density": [0.5, 0.7, 0.9, 0.6]}),
    "breadcrumbs": (3, {}, {"density": [0.8] * 3, "gamma": [0.05, 0.1, 0.0]}),
    "breadcrumbs_ties": (3, {"normalize": True}, {"density": [0.7] * 3}),
    "della": (3, {}, {"density": [0.5] * 3, "epsilon": [0.1, 0.2, 0.3]}),
    "della_linear": (3, {"rescale": False}, {"density": [0.6] * 3}),
}
GEOMETRIC_CASES = {
    "slerp": (1, {"t": FILTERED}),
    "nuslerp": (2, {"nuslerp_flatten": False}),
    "multislerp": (3, {}),
    "karcher": (3, {}),
    "model_stock": (4, {"filter_wise": True}),
    "nearswap": (1, {"t": 0.02}),
    "arcee_fusion": (1, {}),
    "ram": (4, {"epsilon": 0.01}),
    "ramplus_tl": (4, {"epsilon": 0.01, "r": 0.5}),
}
MERGEKIT_DEFAULTS = {  # mergekit's defaults, per method, where the reference needs them
    "ties": {"rescale": "none", "normalize": "weights"},
    "dare_linear": {"rescale": "l1"}, "dare_ties": {"rescale": "l1"},
    "della": {"rescale": "l1", "normalize": "weights"}, "della_linear": {"rescale": "l1"},
}


def _mergekit_yaml(tmp_path, family, method, count, shared, per_model, weighted=True):
    models = [{"model": str(family["base"])}]  # listed as users often do: dropped as the base
    for index, path in enumerate(family["sources"][:count]):
        parameters = {key: values[index] for key, values in per_model.items()}
        if weighted:
            parameters["weight"] = WEIGHTS[index]
        models.append({"model": str(path), "parameters": parameters})
    config = {"merge_method": method, "base_model": str(family["base"]), "models": models,
              "parameters": shared, "dtype": "float32"}
    return write_recipe(tmp_path / "mergekit.yaml", config)


def _resolve(value, name, t):
    """A parameter as written in YAML (a number, a gradient, filter entries) at one tensor."""
    from pydantic import TypeAdapter

    from raymerge.settings import Varying

    parsed = TypeAdapter(Varying[float]).validate_python(value) if not isinstance(
        value, bool) else value
    return evaluate(parsed, name, t)


@pytest.mark.parametrize("method", sorted(GTA_CASES) + ["sce", "linear"])
def test_a_gta_mergekit_yaml_merges_as_mergekit_defines_it(ray_cluster, float32_family,
                                                           tmp_path, method):
    count, shared, per_model = GTA_CASES.get(method, (4, {"select_topk": 0.5}, {}))
    out = tmp_path / "merged"
    if method == "linear":
        path = write_recipe(tmp_path / "mergekit.yaml", {"merge_method": "linear", "models": [
            {"model": str(p), "parameters": {"weight": w}} for p, w in zip(
                [float32_family["base"], *float32_family["sources"][:2]], [2.0, 1.0, 1.0])]})
    else:
        path = _mergekit_yaml(tmp_path, float32_family, method, count, shared, per_model,
                              weighted=method != "sce")
    assert main(["merge", str(path), "--out", str(out), "--no-progress"]) == 0
    base = load_tensors(float32_family["base"])
    sources = [load_tensors(p) for p in float32_family["sources"][:count]]
    merged = load_tensors(out)
    positions = layer_positions(base)
    for name, base_tensor in base.items():
        t = positions[name]
        deltas = deltas_of(base_tensor, [s[name] for s in sources])
        if method == "linear":
            expected = (2 * base_tensor.double() + sources[0][name].double()
                        + sources[1][name].double()) / 4
        else:
            if method == "sce":
                merged_delta = sce(deltas, 0.5)
            else:
                values = {key: [_resolve(v, name, t) for v in values]
                          for key, values in per_model.items()}
                settings_ = {**MERGEKIT_DEFAULTS.get(method, {}), **values,
                             **{k: v for k, v in shared.items() if k != "lambda"}}
                if isinstance(settings_.get("normalize"), bool) and method in (
                        "ties", "dare_ties", "breadcrumbs_ties", "della"):
                    settings_["normalize"] = "weights" if settings_["normalize"] else "none"
                if settings_.get("rescale") is False:
                    settings_["rescale"] = "none"
                reference_method = "dare_linear" if method == "dare_linear" else method
                merged_delta = gta(reference_method, deltas, WEIGHTS[:count], name=name,
                                   **settings_)
            expected = base_tensor.double() + shared.get("lambda", 1.0) * merged_delta
        actual = merged[name].double()
        error = float((actual - expected).norm())
        bound = 2e-5 * float((expected - base_tensor.double()).norm()) + \
            2.0**-23 * float(expected.norm()) + 1e-12
        assert error <= bound, f"{method} {name}: {error:.2e} > {bound:.2e}"


@pytest.mark.parametrize("method", sorted(GEOMETRIC_CASES))
def test_a_geometric_mergekit_yaml_merges_as_mergekit_defines_it(ray_cluster, float32_family,
                                                                 tmp_path, method):
    count, shared = GEOMETRIC_CASES[method]
    weighted = MERGEKIT_METHODS[method].weights
    path = _mergekit_yaml(tmp_path, float32_family, method, count, shared, {}, weighted)
    out = tmp_path / "merged"
    assert main(["merge", str(path), "--out", str(out), "--no-progress"]) == 0
    base = load_tensors(float32_family["base"])
    models = [load_tensors(p) for p in float32_family["sources"][:count]]
    merged = load_tensors(out)
    positions = layer_positions(base)
    for name, base_tensor in base.items():
        keys = {key: _resolve(value, name, positions[name]) for key, value in shared.items()}
        expected = reference_geometric(method, base_tensor, [m[name] for m in models],
                                       WEIGHTS[:count] if weighted else [1.0] * count, keys)
        error = float((merged[name].double() - expected).norm())
        bound = 2e-5 * float((expected - base_tensor.double()).norm()) + \
            2.0**-23 * float(expected.norm()) + 1e-12
        assert error <= bound, f"{method} {name}: {error:.2e} > {bound:.2e}"


def test_mergekit_keys_outside_the_methods_map_or_are_refused(tmp_path):
    def mapped(**extra):
        config = {"merge_method": "ties", "base_model": "org/base@abc123",
                  "models": [{"model": "org/math", "parameters": {"weight": 1.0}},
                             {"model": "org/base@abc123+adapters/chat",
                              "parameters": {"weight": 0.5}}], **extra}
        return load_recipe(write_recipe(tmp_path / "mk.yaml", config))

    recipe = mapped(out_dtype="bfloat16", tokenizer_source="union", chat_template="auto")
    assert recipe.base == "org/base@abc123"  # a Hub id with its revision, as raymerge takes it
    assert [s.path for s in recipe.sources] == ["org/math", "adapters/chat"]  # model+lora
    assert recipe.output.dtype == "bfloat16" and recipe.tokenizer.source == "union"
    assert recipe.chat_template == "auto"
    assert mapped(dtype="float64").runtime.compute_dtype == "float64"
    tokenizer = mapped(tokenizer={"source": "org/math", "pad_to_multiple_of": 64}).tokenizer
    assert (tokenizer.source, tokenizer.pad_to_multiple_of) == ("org/math", 64)
    for extra, message in [
        ({"tokenizer": {"source": "union", "tokens": {"<x>": {"source": "org/math"}}}},
         "tokenizer.tokens"),
        ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "not both"),
        ({"chat_template": "chatml2"}, "none of mergekit's bundled templates"),
        ({"slices": [{"sources": []}]}, "slices"),
        ({"modules": {"text": {}}}, "modules"),
        ({"out_dtype": "int8"}, "out_dtype"),
        ({"merge_method": "passthrough"}, "give slices"),
        ({"tokenizer_sources": "union"}, "'tokenizer_sources' is not a key"),
        ({"parameters": {"int8_mask": "yes"}}, "int8_mask: expected true or false"),
        ({"parameters": {"normalise": True}}, "normalise: not a parameter of mergekit's ties"),
        ({"parameters": {"t": 0.5}}, "t: not a parameter of mergekit's ties"),
    ]:
        with pytest.raises(RecipeError, match=message) as caught:
            mapped(**extra)
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("config, message", [
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "m"}]},
     "weight is required for ties"),
    ({"merge_method": "ties", "models": [{"model": "m", "parameters": {"weight": 1}}]},
     "base_model is required for ties"),
    ({"merge_method": "slerp", "base_model": "b", "parameters": {"t": 0.5},
      "models": [{"model": "m"}, {"model": "n"}]}, "slerp merges 1 model"),
    ({"merge_method": "slerp", "base_model": "b", "models": [
        {"model": "m", "parameters": {"t": 0.5}}]}, "binds it once for all models"),
    ({"merge_method": "karcher", "base_model": "b", "models": [
        {"model": "m", "parameters": {"weight": 2}}]}, "not a parameter of mergekit's karcher"),
    ({"merge_method": "multislerp", "models": [
        {"model": "m", "parameters": {"weight": 1}}, {"model": "n", "parameters": {"weight": 1}}
    ]}, "multislerp without base_model"),
    ({"merge_method": "ties", "base_model": "b", "models": [
        {"model": "b", "parameters": {"t": 1}}, {"model": "m", "parameters": {"weight": 1}}
    ]}, "models.0.parameters.t: not a parameter of mergekit's ties"),
    ({"merge_method": "linear", "base_model": "b", "models": [
        {"model": "m", "parameters": {"weight": 1}}]}, "base_model is not among the models"),
    ({"merge_method": "linear", "models": [{"model": "m", "parameters": {"weight": 1}},
                                           {"model": "n", "parameters": {"weight": 2}}],
      "parameters": {"normalize": False}}, "normalize: false with weights summing to 3"),
    ({"merge_method": "task_arithmetic", "base_model": "b", "models": [
        {"model": "x+lora", "parameters": {"weight": 1}}]}, "is a LoRA on x, not on base_model"),
    ({"merge_method": "ties", "base_model": "b", "models": [
        {"model": "m", "parameters": {"weight": 1}, "layer_range": [0, 4]}]},
     "models.0.layer_range: not a key"),
])
def test_mergekit_recipes_mergekit_itself_would_refuse_or_raymerge_cannot_keep_fail_clearly(
        tmp_path, config, message):
    with pytest.raises(RecipeError, match=message) as caught:
        load_recipe(write_recipe(tmp_path / "mk.yaml", config))
    assert "\n" not in str(caught.value)


# --- every key and value either changes the recipe or is an error (fuzzed) -------------------

def valid_config(method: str) -> dict:
    """A mergekit configuration of `method` that maps (models m0, m1, ... besides base b)."""
    if method in GEOMETRIC_CASES:
        count, shared = GEOMETRIC_CASES[method]
    else:
        count, shared = {"linear": (2, {}), "sce": (2, {})}.get(method, (2, {}))
    weighted = MERGEKIT_METHODS[method].weights
    models = [{"model": f"m{i}", "parameters": {}} for i in range(count)]
    config = {"merge_method": method, "models": models,
              "parameters": {**shared, **({"weight": 1.0} if weighted else {})}}
    if method != "linear":
        config["base_model"] = "b"
    return config


KEY_NAMES = sorted(TOP_LEVEL | {"normalize", "rescale", "lambda", "density", "gamma", "epsilon",
                                "t", "weight", "int8_mask", "select_topk", "normalise", "filter",
                                "value", "tokenizer", "layer_range", "max_iter", "filter_wise",
                                "nuslerp_flatten", "r", "alpha"} | set(NO_EFFECT))
VALUES = st.one_of(st.booleans(), st.floats(-2, 2, allow_nan=False), st.integers(-3, 300),
                   st.sampled_from(["union", "base", "m", "auto", "bfloat16", "float32", "{{x}}",
                                    "chatml", ""]),
                   st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=3),
                   st.just([{"filter": "mlp", "value": 0.3}]), st.just({"source": "m"}))
WHERE = st.sampled_from(["top", "parameters", "model0", "model1"])
METHOD_NAMES = sorted(MERGEKIT_METHODS)
FUZZ = int(os.environ.get("FUZZ_EXAMPLES", "150"))


def _mapped(config: dict):
    from raymerge.mergekit import recipe_from_mergekit

    return recipe_from_dict(recipe_from_mergekit(copy.deepcopy(config), "mk.yaml"), "mk.yaml")


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(METHOD_NAMES), where=WHERE, key=st.sampled_from(KEY_NAMES),
       value=VALUES, other=VALUES)
def test_no_mergekit_key_is_silently_ignored(method, where, key, value, other):
    """A key either is refused (one line), or two different values of it give two different
    recipes: a key raymerge dropped would give the same recipe for both."""

    def with_key(chosen):
        changed = valid_config(method)
        if where == "top":
            changed[key] = chosen
        elif where == "parameters":
            changed["parameters"][key] = chosen
        else:
            models = changed["models"]
            models[int(where[-1]) % len(models)]["parameters"][key] = chosen
        try:
            return yaml.safe_dump(_mapped(changed).model_dump(mode="json"))
        except RecipeError as error:
            assert "\n" not in str(error)
            return None

    first, second = with_key(value), with_key(other)
    if first is None or second is None or value == other:  # equal values (False == 0.0 too)
        return
    assert first != second, (method, where, key, value, other)


def test_every_mapped_method_is_reachable():
    for method in MERGEKIT_METHODS:
        assert _mapped(valid_config(method)).method.name == MERGEKIT_METHODS[method].method


def test_a_gradient_and_a_filter_resolve_per_layer_as_mergekit_does(tmp_path):
    recipe = load_recipe(_mergekit_yaml(tmp_path, {"base": "b", "sources": ["m", "n"]}, "ties",
                                        2, {}, {"density": [GRADIENT, FILTERED]}))
    first, second = recipe.sources
    assert evaluate(first.parameters["density"], "model.layers.0.x", 0.0) == 0.3
    assert evaluate(first.parameters["density"], "model.layers.9.x", 1.0) == 0.7
    assert evaluate(second.parameters["density"], "model.layers.0.mlp.up_proj.weight", 0.0) == 0.4
    assert evaluate(second.parameters["density"], "model.layers.0.self_attn.q.weight", 0.0) == 0.8
