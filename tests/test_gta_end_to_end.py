"""`raymerge merge` with each method of mergekit's generalized task arithmetic family (with
weights and per-source parameters) and SCE, on the tiny float32 Llama, equals the dense float64
reference written from mergekit's formulas."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_merged_close, load_tensors, write_recipe
from reference import deltas_of
from reference_mergekit import gta, sce

from raymerge.cli import main

WEIGHTS = [1.0, 0.5, 0.75, 1.25]

# method block, each source's own parameters, and the reference's settings
CASES = {
    "dare_ties": ({"name": "dare_ties", "seed": 7}, {"density": [0.5, 0.3, 0.7, 0.6]},
                  {"rescale": "l1", "seed": 7}),
    "breadcrumbs": ({"name": "breadcrumbs", "density": 0.5, "normalize": True},
                    {"gamma": [0.05, 0.1, 0.0, 0.2]}, {"normalize": True}),
    "breadcrumbs_ties": ({"name": "breadcrumbs_ties", "density": 0.6, "gamma": 0.05}, {}, {}),
    "della": ({"name": "della", "density": 0.5, "seed": 3}, {"epsilon": [0.1, 0.2, 0.3, 0.15]},
              {"rescale": "l1", "normalize": True, "seed": 3}),
    "della_linear": ({"name": "della_linear", "density": 0.4, "epsilon": 0.2, "seed": 5}, {},
                     {"rescale": "l1", "seed": 5}),
    "sce": ({"name": "sce", "select_topk": 0.5}, {}, {}),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_merge_equals_mergekit_dense_reference(ray_cluster, float32_family, tmp_path, method):
    block, per_source, reference_settings = CASES[method]
    scale = 0.8
    out = tmp_path / "merged"
    weights = [1.0] * len(WEIGHTS) if method == "sce" else WEIGHTS  # sce weighs no source
    sources = [{"path": str(path), "weight": weight,
                "parameters": {key: values[index] for key, values in per_source.items()}}
               for index, (path, weight) in enumerate(zip(float32_family["sources"], weights))]
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(float32_family["base"]), "sources": sources,
        "method": {**block, "scale": scale}, "output": {"path": str(out)}})
    assert main(["merge", str(recipe), "--no-progress"]) == 0

    base = load_tensors(float32_family["base"])
    loaded = [load_tensors(path) for path in float32_family["sources"]]
    merged = load_tensors(out)
    assert set(merged) == set(base)
    shared = {key: value for key, value in block.items() if key != "name"}
    for name, base_tensor in base.items():
        deltas = deltas_of(base_tensor, [source[name] for source in loaded])
        if method == "sce":
            merged_delta = sce(deltas, block["select_topk"])
        else:
            merged_delta = gta(method, deltas, weights, name=name,
                               **{**shared, **per_source, **reference_settings})
        expected = (base_tensor.double() + scale * merged_delta).to(torch.float32)
        assert_merged_close(merged[name], expected, name)
