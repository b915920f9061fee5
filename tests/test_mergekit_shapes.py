"""mergekit recipes in the shapes people publish them: LazyMergekit's full-range `slices:` slerp,
`int8_mask` and other options with no effect (accepted and reported), the base listed among
the models (with or without parameters), named chat templates, and the slice layouts raymerge
refuses (one line each)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import file_digests, load_tensors, write_recipe
from reference_mergekit_geometric import reference_geometric

from raymerge.chat_templates import NAMES, named_template
from raymerge.cli import main
from raymerge.errors import RecipeError
from raymerge.merge import prepare, run_merge
from raymerge.mergekit import MERGEKIT_METHODS, recipe_from_mergekit
from raymerge.recipe import load_recipe, recipe_from_dict
from raymerge.roles import layer_positions
from raymerge.settings import evaluate

LAYERS = 3  # tests/conftest.py's TINY_LLAMA
GRADIENT_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
              {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]


def _mapped(config: dict):
    return recipe_from_dict(recipe_from_mergekit(config, "mk.yaml"), "mk.yaml")


def _lazy_slerp(base: str, other: str, end: int = LAYERS, **extra) -> dict:
    """LazyMergekit's slerp, as published on model cards."""
    return {"slices": [{"sources": [{"model": base, "layer_range": [0, end]},
                                    {"model": other, "layer_range": [0, end]}]}],
            "merge_method": "slerp", "base_model": base, "parameters": {"t": GRADIENT_T},
            "dtype": "float32", **extra}


def test_a_full_range_slerp_slice_merges_as_the_whole_model_with_gradients(
        ray_cluster, float32_family, tmp_path, capsys):
    base, other = str(float32_family["base"]), str(float32_family["sources"][0])
    config = _lazy_slerp(base, other)
    config["slices"][0]["residual_weight"] = 0.5  # defined by mergekit 0.1.5, read nowhere
    path = write_recipe(tmp_path / "lazy.yaml", config)
    out = tmp_path / "merged"
    assert main(["merge", str(path), "--out", str(out), "--no-progress"]) == 0
    assert "accepted, no effect in raymerge: slices.0.residual_weight = 0.5: mergekit 0.1.5 " \
        "defines it" in capsys.readouterr().out
    base_tensors = load_tensors(float32_family["base"])
    source = load_tensors(float32_family["sources"][0])
    merged = load_tensors(out)
    positions = layer_positions(base_tensors)
    recipe = load_recipe(path)
    for name, base_tensor in base_tensors.items():  # t per mergekit: slice layer i at i/(n−1)
        t = evaluate(recipe.method.t, name, positions[name])
        expected = reference_geometric("slerp", base_tensor, [source[name]], [1.0], {"t": t})
        error = float((merged[name].double() - expected).norm())
        assert error <= 2e-5 * float((expected - base_tensor.double()).norm()) + \
            2.0**-23 * float(expected.norm()) + 1e-12, name
    # the same recipe in models: form maps to the same raymerge recipe, the slice's range aside
    models_form = _lazy_slerp(base, other)
    models_form["models"] = [{"model": base}, {"model": other}]
    del models_form["slices"]
    assert recipe.model_dump(exclude={"slices", "no_effect"}) == \
        _mapped(models_form).model_dump(exclude={"slices", "no_effect"})


def test_slice_parameters_resolve_over_the_top_level_as_mergekit_does():
    config = _lazy_slerp("b", "m")
    config["slices"][0]["parameters"] = {"t": [{"filter": "mlp", "value": 0.9}]}
    t = _mapped(config).method.t  # the slice's filter first, then the top level's list
    assert evaluate(t, "model.layers.0.mlp.up_proj.weight", 0.0) == 0.9
    assert evaluate(t, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.3
    assert evaluate(t, "model.norm.weight", 0.0) == 0.5
    per_model = _lazy_slerp("b", "m")
    per_model["merge_method"] = "ties"
    per_model["parameters"] = {"normalize": True}
    per_model["slices"][0]["sources"][1]["parameters"] = {"weight": 0.7, "density": 0.4}
    (source,) = _mapped(per_model).sources
    assert (source.path, source.weight, source.parameters) == ("m", 0.7, {"density": 0.4})


def test_a_slice_range_out_of_bounds_fails_before_work(float32_family, tmp_path):
    base, other = str(float32_family["base"]), str(float32_family["sources"][0])
    recipe = load_recipe(write_recipe(tmp_path / "mk.yaml", _lazy_slerp(base, other, LAYERS + 1)))
    with pytest.raises(RecipeError, match=r"\[0, 4\] is outside the 3 layers") as caught:
        prepare(recipe, out=tmp_path / "out")
    assert "\n" not in str(caught.value)
    whole = load_recipe(write_recipe(tmp_path / "mk.yaml", _lazy_slerp(base, other)))
    assert prepare(whole, out=tmp_path / "out").slices is None  # the whole-model merge


def _frankenmerge(first: str, second: str, **extra) -> dict:
    """mergekit's orcamini-platy-44layer.yml shape: layers 0-1 of one model, then 1-2 of another."""
    return {"slices": [{"sources": [{"model": first, "layer_range": [0, 2]}]},
                       {"sources": [{"model": second, "layer_range": [1, 3]}]}],
            "merge_method": "passthrough", "dtype": "float32", **extra}


def test_a_frankenmerge_copies_each_block_from_its_source_byte_for_byte(
        ray_cluster, float32_family, tmp_path):
    first, second = float32_family["base"], float32_family["sources"][1]
    path = write_recipe(tmp_path / "mk.yaml", _frankenmerge(str(first), str(second)))
    out, again = tmp_path / "merged", tmp_path / "again"
    assert main(["merge", str(path), "--out", str(out), "--no-progress"]) == 0
    merged, a, b = load_tensors(out), load_tensors(first), load_tensors(second)
    expected = {"model.embed_tokens.weight": a["model.embed_tokens.weight"],  # first slice's
                "model.norm.weight": b["model.norm.weight"], "lm_head.weight": b["lm_head.weight"]}
    for name, tensor in a.items():
        if name.startswith("model.layers.0.") or name.startswith("model.layers.1."):
            expected[name] = tensor
    for name, tensor in b.items():
        for source_layer, output_layer in ((1, 2), (2, 3)):
            prefix = f"model.layers.{source_layer}."
            if name.startswith(prefix):
                expected[f"model.layers.{output_layer}." + name[len(prefix):]] = tensor
    assert sorted(merged) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    recipe = load_recipe(path)  # the same bytes whatever the order and number of tasks in flight
    recipe.runtime.max_in_flight = 1
    run_merge(prepare(recipe, out=again), show_progress=False)
    assert file_digests(out) == file_digests(again)


def test_merged_slices_take_their_own_parameters_and_gradients(ray_cluster, float32_family,
                                                               tmp_path, capsys):
    base, other = str(float32_family["base"]), str(float32_family["sources"][0])
    config = {"merge_method": "slerp", "base_model": base, "dtype": "float32",
              "parameters": {"t": 0.5},
              "slices": [{"sources": [{"model": base, "layer_range": [0, 2]},
                                      {"model": other, "layer_range": [0, 2]}],
                          "parameters": {"t": [0.1, 0.3]}},
                         {"sources": [{"model": base, "layer_range": [1, 3]},
                                      {"model": other, "layer_range": [1, 3]}]}]}
    out, path = tmp_path / "merged", write_recipe(tmp_path / "mk.yaml", config)
    assert main(["plan", str(path)]) == 0  # each slice's values, unit by unit
    shown = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert shown["model.layers.1"].endswith("t 0.3") and "t" not in shown["model.layers.3"][40:]
    assert main(["merge", str(path), "--out", str(out), "--no-progress"]) == 0
    merged, a, b = load_tensors(out), load_tensors(base), load_tensors(other)
    # output block -> (input block, t): the first slice's gradient over its own 2 layers
    blocks = {0: (0, 0.1), 1: (1, 0.3), 2: (1, 0.5), 3: (2, 0.5)}
    for name, tensor in merged.items():
        parts = name.split(".")
        if name.startswith("model.layers."):
            source_layer, t = blocks[int(parts[2])]
            source = ".".join([*parts[:2], str(source_layer), *parts[3:]])
        else:
            source, t = name, 0.1 if "embed" in name else 0.5  # first slice, last slice, at t=0
        expected = reference_geometric("slerp", a[source], [b[source]], [1.0], {"t": t})
        error = float((tensor.double() - expected).norm())
        assert error <= 2e-5 * float((expected - a[source].double()).norm()) + \
            2.0**-23 * float(expected.norm()) + 1e-12, name


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    root = tmp_path_factory.mktemp("gemma")
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=16, sliding_window=8, max_position_embeddings=64,
                              layer_types=["sliding_attention", "full_attention",
                                           "sliding_attention"])
    Gemma3ForCausalLM(config).save_pretrained(root / "base")
    return root / "base"


def test_depth_up_scaling_a_gemma_model_follows_its_per_layer_config(ray_cluster, tiny_gemma,
                                                                     tmp_path):
    from transformers import AutoModelForCausalLM

    config = _frankenmerge(str(tiny_gemma), str(tiny_gemma))  # depth up-scaling, as published:
    config["slices"][1]["parameters"] = {"scale": [  # the repeated layers' outputs zeroed
        {"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}, {"value": 1}]}
    path = write_recipe(tmp_path / "mk.yaml", config)
    out = tmp_path / "merged"
    assert main(["merge", str(path), "--out", str(out), "--no-progress"]) == 0
    merged, source = load_tensors(out), load_tensors(tiny_gemma)
    for output_layer, source_layer in ((0, 0), (1, 1), (2, 1), (3, 2)):
        for part in ("self_attn.o_proj", "mlp.down_proj", "mlp.up_proj"):
            got = merged[f"model.layers.{output_layer}.{part}.weight"]
            copied = source[f"model.layers.{source_layer}.{part}.weight"]
            zeroed = output_layer >= 2 and part != "mlp.up_proj"
            assert torch.equal(got, torch.zeros_like(copied) if zeroed else copied), \
                (output_layer, part)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    assert config["layer_types"] == ["sliding_attention", "full_attention", "full_attention",
                                     "sliding_attention"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 4
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 96)


@pytest.mark.parametrize("config, message", [
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]},
                 {"sources": [{"model": "b", "layer_range": [1, 3]}]}],
      "merge_method": "slerp", "base_model": "a"}, "slices.0: slerp merges 1 model"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                              {"model": "b", "layer_range": [0, 2]}]}],
      "merge_method": "passthrough"}, "passthrough copies one model's layers per slice"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2],
                               "parameters": {"weight": 0.5}}]}],
      "merge_method": "passthrough"}, "weight: not a parameter of mergekit's passthrough"),
    ({"models": [{"model": "a"}], "merge_method": "passthrough"}, "give slices"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                              {"model": "b", "layer_range": [0, 3]}]}],
      "merge_method": "slerp", "base_model": "a"}, "every model of a slice gives the same"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [2, 1]}]}],
      "merge_method": "slerp", "base_model": "a"}, "0 <= start < end"),
    ({"slices": [{"sources": [{"model": "m", "layer_range": [0, 2],
                               "parameters": {"weight": 1}}]}],
      "merge_method": "ties", "base_model": "b"}, "base_model b is not among the slice's"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2], "range": 1}]}],
      "merge_method": "slerp"}, "range: not a key of a mergekit slice source"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}],
      "models": [{"model": "a"}], "merge_method": "slerp"}, "models or slices, not both"),
    ({"modules": {"text": {}}, "merge_method": "slerp"}, "modules"),
])
def test_slice_layouts_raymerge_does_not_merge_are_one_line_errors(config, message):
    with pytest.raises(RecipeError, match=message) as caught:
        _mapped(config)
    assert "\n" not in str(caught.value)


def _ties(**parameters) -> dict:
    return {"merge_method": "ties", "base_model": "b", "parameters": parameters,
            "models": [{"model": "b"}, {"model": "m", "parameters": {"weight": 1.0,
                                                                   "density": 0.5}}]}


def test_int8_mask_and_residual_weight_are_accepted_and_reported(float32_family, tmp_path,
                                                                 capsys):
    with_mask, without = _mapped(_ties(int8_mask=True, normalize=True)), _mapped(
        _ties(normalize=True))
    assert with_mask.model_dump(exclude={"no_effect"}) == without.model_dump(exclude={"no_effect"})
    assert with_mask.no_effect["parameters.int8_mask"].startswith("true: it only picks")
    sliced = _lazy_slerp("b", "m")
    sliced["slices"][0]["residual_weight"] = 0.3
    assert "reads it nowhere" in _mapped(sliced).no_effect["slices.0.residual_weight"]
    for method in ("slerp", "karcher"):  # methods without the parameter: still an error
        config = {**_ties(int8_mask=True), "merge_method": method}
        with pytest.raises(RecipeError, match=f"int8_mask: not a parameter of mergekit's {method}"):
            _mapped(config)
    base, source = str(float32_family["base"]), str(float32_family["sources"][0])
    config = {**_ties(int8_mask=True), "base_model": base}
    config["models"] = [{"model": base}, {"model": source, "parameters": {"weight": 1.0}}]
    path = write_recipe(tmp_path / "mk.yaml", config)
    assert main(["plan", str(path)]) == 0
    assert "accepted, no effect in raymerge: parameters.int8_mask = true: it only picks" in \
        capsys.readouterr().out


@pytest.mark.parametrize("method", sorted(name for name, spec in MERGEKIT_METHODS.items()
                                          if spec.base != "symmetric"))
def test_the_base_among_the_models_is_not_merged_and_its_parameters_are_reported(method):
    """mergekit 0.1.5 merges only the non-base inputs of every method that has a base (the base
    is not counted in normalisation nor in model_stock's N) and resolves no per-model parameter
    for the base: listing it, with or without parameters, changes nothing."""
    spec = MERGEKIT_METHODS[method]
    count = max(spec.sources[0], 2 if method in ("model_stock", "nuslerp") else 1)
    count = min(count, spec.sources[1] or count)
    shared = {"slerp": {"t": 0.5}, "nearswap": {"t": 0.5}}.get(method, {})
    weight = {"weight": 1.0} if spec.weights else {}
    models = [{"model": f"m{i}", "parameters": dict(weight)} for i in range(count)]
    config = {"merge_method": method, "base_model": "b", "models": models, "parameters": shared}
    alone = _mapped(config)
    for base_parameters in ({}, {"weight": 0.4} if spec.weights else {}):
        listed = {**config, "models": [{"model": "b", "parameters": base_parameters}, *models]}
        recipe = _mapped(listed)
        assert recipe.model_dump(exclude={"no_effect"}) == alone.model_dump(exclude={"no_effect"})
        assert sorted(recipe.no_effect) == [f"models.0.parameters.{key}"
                                            for key in base_parameters]


@pytest.mark.parametrize("name", NAMES)
def test_a_named_chat_template_is_mergekits_text(name):
    config = {**_ties(), "chat_template": name}
    text = _mapped(config).chat_template
    assert text == named_template(name) and "{%" in text
    assert {"chatml": "<|im_start|>", "llama3": "<|start_header_id|>",
            "mistral": "[INST]"}.get(name, "") in text


def _checkpoint(label: str, widths: list[int]):
    """Header-only checkpoint: layer i has a [widths[i], 8] projection."""
    from pathlib import Path

    from raymerge.sources.checkpoint import Checkpoint, TensorInfo

    tensors = {f"model.layers.{i}.mlp.up_proj.weight": TensorInfo(
        f"model.layers.{i}.mlp.up_proj.weight", "F32", (width, 8), f"/{label}.safetensors", 0)
        for i, width in enumerate(widths)}
    tensors["model.norm.weight"] = TensorInfo("model.norm.weight", "F32", (8,), "/x", 0)
    return Checkpoint(label=label, directory=Path("/"), tensors=tensors)


def test_slices_pair_layers_only_where_their_shapes_match():
    from raymerge.layout import slice_jobs

    recipe = recipe_from_dict({"base": "a", "sources": ["b"], "method": {"name": "slerp", "t": .5},
                               "slices": [{"sources": [{"path": "a", "layer_range": [0, 2]},
                                                       {"path": "b", "layer_range": [1, 3]}]}]})
    checkpoints = {"a": _checkpoint("a", [4, 4, 4]), "b": _checkpoint("b", [4, 4, 6])}
    with pytest.raises(RecipeError, match=r"slices.0.sources.1: b has shape \[6, 8\] where the "
                                          r"slice's base has model.layers.1.mlp.up_proj.weight"):
        slice_jobs(recipe, checkpoints)
    checkpoints["b"] = _checkpoint("b", [4, 4, 4])
    (job,) = slice_jobs(recipe, checkpoints)  # b's layers 1, 2 as output blocks 0, 1
    assert job.sources[0].tensors["model.layers.0.mlp.up_proj.weight"].name == \
        "model.layers.1.mlp.up_proj.weight"
    assert sorted(job.base.tensors) == ["model.layers.0.mlp.up_proj.weight",
                                        "model.layers.1.mlp.up_proj.weight", "model.norm.weight"]


def test_every_per_layer_list_of_the_config_follows_the_new_layout():
    from raymerge.layout import relayered_config

    config = {"num_hidden_layers": 3, "vocab_size": 3, "layer_types": ["s", "f", "s"],
              "text_config": {"num_hidden_layers": 3, "no_rope_layers": [1, 0, 1]}}
    assert relayered_config(config, 3, [0, 1, 1, 2]) == {
        "num_hidden_layers": 4, "vocab_size": 3, "layer_types": ["s", "f", "f", "s"],
        "text_config": {"num_hidden_layers": 4, "no_rope_layers": [1, 0, 0, 1]}}
