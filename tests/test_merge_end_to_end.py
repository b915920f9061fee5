"""`raymerge merge` on tiny Llama checkpoints equals the dense reference, and transformers loads
the result."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_merged_close, load_tensors, manifest, method_block, write_recipe
from reference import reference_merge

from raymerge.cli import main

# Exactly representable weights: with bfloat16 sources, TIES's elected sign can be an exact zero
# (e.g. 0.8·a + 1.2·b = 0 in float64 but not in float32); such ties would test rounding, not TIES.
WEIGHTS = [1.0, 0.5, 0.75, 1.25]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare"])
def test_merge_equals_dense_reference_and_loads_in_transformers(
    ray_cluster, tiny_family, tmp_path, method
):
    settings = method_block(method, scale=0.7, density=0.4, p=0.3, seed=7)
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(tiny_family["base"]),
        "sources": [{"path": str(path), "weight": weight}
                    for path, weight in zip(tiny_family["sources"], WEIGHTS)],
        "method": settings,
        "output": {"path": str(out), "shard_size": "40KB"},
    })
    assert main(["merge", str(recipe), "--no-progress"]) == 0

    base = load_tensors(tiny_family["base"])
    sources = [load_tensors(path) for path in tiny_family["sources"]]
    merged = load_tensors(out)
    assert set(merged) == set(base)
    for name, base_tensor in base.items():
        expected = reference_merge(
            method, base_tensor, [source[name] for source in sources], WEIGHTS, name=name,
            scale=0.7, density=0.4, p=0.3, seed=7,
        ).to(base_tensor.dtype)
        assert merged[name].dtype == base_tensor.dtype
        assert_merged_close(merged[name], expected, name)

    _assert_loadable(out, tiny_family["dtype"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1, "a 40KB shard_size must split this model"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in merged.values())
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    facts = manifest(out)
    assert len(facts["sources"]) == 4 and facts["sources"][1]["weight"] == 0.5
    assert all(len(f["sha256"]) == 64 for f in facts["base"]["files"].values())
    assert set(facts["tensors"]) == set(base)
    assert method in (out / "README.md").read_text()


def test_output_dtype_converts_and_config_follows(ray_cluster, float32_family, tmp_path):
    tiny_family = float32_family
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(tiny_family["base"]),
        "sources": [str(path) for path in tiny_family["sources"][:3]],
        "output": {"path": str(out), "dtype": "bfloat16"},
    })
    assert main(["merge", str(recipe), "--no-progress"]) == 0
    merged = load_tensors(out)
    assert {tensor.dtype for tensor in merged.values()} == {torch.bfloat16}
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    _assert_loadable(out, "bfloat16")


def test_rerun_replaces_previous_output_whole(ray_cluster, float32_family, tmp_path):
    tiny_family = float32_family
    out = tmp_path / "merged"
    recipe = {"base": str(tiny_family["base"]), "sources": [str(tiny_family["sources"][0])],
              "output": {"path": str(out), "shard_size": "40KB"}}
    assert main(["merge", str(write_recipe(tmp_path / "a.yaml", recipe)), "--no-progress"]) == 0
    first_shards = sorted(p.name for p in out.glob("*.safetensors"))
    recipe["output"]["shard_size"] = "10GB"
    assert main(["merge", str(write_recipe(tmp_path / "b.yaml", recipe)), "--no-progress"]) == 0
    assert len(first_shards) > 1
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml", "b.yaml", "merged"]


def _assert_loadable(directory, dtype: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    assert model.dtype == getattr(torch, dtype)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, 96) and torch.isfinite(logits).all()
