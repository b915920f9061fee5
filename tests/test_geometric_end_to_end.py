"""`raymerge merge` with each of mergekit's geometric and two-model methods equals the dense
float64 implementation of mergekit's definition on the tiny float32 Llama family (every tensor:
matrices, norms, embeddings), with gradients and filters resolved per tensor as mergekit does."""

from __future__ import annotations

import pytest
from helpers import load_tensors, manifest, write_recipe
from reference_mergekit_geometric import reference_geometric

from raymerge.cli import main
from raymerge.recipe import method_settings
from raymerge.roles import layer_positions

# (method, sources, weights or None, method keys): each case also exercises a non-default key
CASES = [
    ("slerp", 1, None, {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
                              {"value": 0.3}]}),
    ("nuslerp", 2, [1.0, 0.6], {"nuslerp_flatten": False}),
    ("nuslerp", 1, [0.7], {"nuslerp_flatten": False, "nuslerp_row_wise": True,
                          "base_weight": 1.2}),
    ("multislerp", 3, [1.0, 0.5, 1.5], {}),
    ("karcher", 3, None, {"max_iter": 20}),
    ("model_stock", 4, None, {"filter_wise": True}),
    ("nearswap", 1, None, {"t": 0.02}),
    ("arcee_fusion", 1, None, {}),
    ("ram", 4, None, {"epsilon": 0.01}),
    ("ramplus_tl", 4, None, {"epsilon": 0.01, "r": 0.5, "alpha": 0.5}),
]


@pytest.mark.parametrize("method, count, weights, keys", CASES,
                         ids=[f"{case[0]}-{case[1]}" for case in CASES])
def test_geometric_merge_equals_mergekit_definition(ray_cluster, float32_family, tmp_path,
                                                    method, count, weights, keys):
    paths = float32_family["sources"][:count]
    sources = ([{"path": str(p), "weight": w} for p, w in zip(paths, weights)] if weights
               else [str(p) for p in paths])
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(float32_family["base"]), "sources": sources,
        "method": {"name": method, **keys}, "output": {"path": str(out)}})
    assert main(["merge", str(recipe), "--no-progress"]) == 0

    base = load_tensors(float32_family["base"])
    models = [load_tensors(p) for p in paths]
    merged = load_tensors(out)
    positions = layer_positions(base)
    recipe_settings = method_settings({"name": method, **keys})
    errors = {}
    for name, base_tensor in base.items():
        resolved = recipe_settings.at(name, positions[name])  # mergekit's gradients and filters
        settings = {key: getattr(resolved, key) for key in keys}
        expected = reference_geometric(method, base_tensor, [m[name] for m in models],
                                       weights or [1.0] * count, settings)
        expected_delta = expected - base_tensor.double()
        actual_delta = merged[name].double() - base_tensor.double()
        # 2e-5 of the merged delta, plus the float32 output's own rounding (2⁻²³ of W)
        bound = 2e-5 * float(expected_delta.norm()) + 2.0**-23 * float(expected.norm())
        errors[name] = float((actual_delta - expected_delta).norm()) / bound
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1, f"{worst}: error {errors[worst]:.2f} × the bound"
    assert method in (out / "README.md").read_text()
    assert set(manifest(out)["tensors"]) == set(base)
