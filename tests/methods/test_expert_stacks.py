"""3-D expert stacks [E, m, n] (GPT-OSS-style MoE weights): spectral methods and SVC treat each
expert's slice as the matrix it is, with statistics per slice."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_tensors, manifest, write_recipe
from reference import reference_merge
from reference_spectral import reference_spectral, svc
from safetensors.torch import save_file

from raymerge.cli import main
from raymerge.methods import MergeOptions, build_method
from raymerge.recipe import method_settings

STACK = "model.layers.0.mlp.experts.gate_up_proj"


def _stream(settings: dict, deltas: list[torch.Tensor], base: torch.Tensor, svc_alpha=None):
    method = build_method(method_settings(settings), [1.0] * len(deltas),
                          MergeOptions(svd="exact"), svc_alpha, tensor=(STACK, base.shape))
    method.begin(STACK, base)
    for pass_index in range(method.passes):
        for index, delta in enumerate(deltas):
            method.update(pass_index, index, delta.clone())
    return method.finish(), method.report


@pytest.mark.parametrize("name, calibrate", [("axis", True), ("tsv", False), ("iso_cts", True),
                                             ("task_arithmetic", True)])
def test_each_expert_slice_is_merged_as_a_matrix(name, calibrate):
    generator = torch.Generator().manual_seed(3)
    base = torch.zeros(3, 12, 10, dtype=torch.float64)
    deltas = [torch.randn(3, 12, 10, generator=generator, dtype=torch.float64) * (1 + i)
              for i in range(3)]
    settings = {"name": name, **({"k": 4} if name == "axis" else {})}
    merged, report = _stream(settings, deltas, base, 1 / 3 if calibrate else None)
    for expert in range(3):
        slices = [d[expert] for d in deltas]
        if name == "task_arithmetic":
            expected = sum(slices)
            expected = svc(expected, slices, 1 / 3) if calibrate else expected
        else:
            expected = reference_spectral(name, "m", base[expert], [base[expert] + s
                                                                    for s in slices],
                                          [1.0] * 3, k=4, svc_alpha=1 / 3 if calibrate else None)
        torch.testing.assert_close(merged[expert], expected, rtol=1e-9, atol=1e-10)
    assert set(report.parts) == ({"[0]", "[1]", "[2]"} if calibrate or name != "task_arithmetic"
                                 else set())
    if name == "axis":
        assert [report.parts[f"[{e}]"]["axis_rank"] for e in range(3)] == [4, 4, 4]


def test_an_expert_stack_merges_end_to_end_with_statistics_per_slice(ray_cluster, tmp_path):
    generator = torch.Generator().manual_seed(0)
    shapes = {STACK: (4, 16, 12), "model.layers.0.mlp.experts.down_proj": (4, 12, 8),
              "model.layers.0.input_layernorm.weight": (12,)}
    base = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    config = {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"]}
    paths = []
    for index in range(4):
        directory = tmp_path / ("base" if index == 0 else f"ft-{index}")
        directory.mkdir()
        tensors = {name: (tensor + (0.05 * torch.randn(tensor.shape, generator=generator)
                                    if index else 0)).contiguous()
                   for name, tensor in base.items()}
        save_file(tensors, directory / "model.safetensors")
        (directory / "config.json").write_text(json.dumps(config))
        paths.append(directory)
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(paths[0]), "sources": [str(p) for p in paths[1:]],
        "method": {"name": "axis", "k": 3}, "calibrate": {"svc": {"alpha": "auto"}},
        "runtime": {"svd": "exact"}, "output": {"path": str(out)}})
    assert main(["merge", str(recipe), "--no-progress"]) == 0
    merged, sources = load_tensors(out), [load_tensors(p) for p in paths[1:]]
    for name, base_tensor in base.items():
        if base_tensor.dim() == 1:
            expected = reference_merge("task_arithmetic", base_tensor,
                                       [s[name] for s in sources], [1 / 3] * 3)
        else:
            expected = torch.stack([reference_spectral(
                "axis", name, base_tensor[e], [s[name][e] for s in sources], [1.0] * 3, k=3,
                svc_alpha=1 / 3) for e in range(base_tensor.shape[0])])
        torch.testing.assert_close(merged[name].double(), expected, rtol=2e-5, atol=2e-5)
    stats = manifest(out)["tensors"]
    assert stats[STACK]["expert_slices"] == 4
    assert [stats[f"{STACK}[{e}]"]["axis_rank"] for e in range(4)] == [3] * 4
    assert all(stats[f"{STACK}[{e}]"]["svc_gamma_min"] > 0 for e in range(4))
