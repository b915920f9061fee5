"""PEFT LoRA adapters as sources: Δ = (alpha/r)·B·A, merged in factored form by the spectral
methods, equal to the dense definition; adapters that do not fit the base are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_tensors, method_block, published, write_recipe
from reference import reference_merge
from reference_spectral import reference_spectral
from safetensors.torch import save_file

from raymerge.cli import main
from raymerge.memory import PeakMemory
from raymerge.methods import MergeOptions, build_method
from raymerge.recipe import method_settings

MODULES = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]


def write_lora(directory: Path, base_dir: Path, seed: int, rank: int = 3, alpha: float = 6.0,
               modules=MODULES, rename: dict | None = None) -> dict[str, torch.Tensor]:
    """An adapter in PEFT's on-disk format; returns the dense Δ of each target."""
    base = load_tensors(base_dir)
    generator = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for layer in range(3):
        for module in modules:
            name = f"model.layers.{layer}.{module}.weight"
            rows, cols = base[name].shape
            down = torch.randn(rank, cols, generator=generator) * 0.2
            up = torch.randn(rows, rank, generator=generator) * 0.2
            key = f"base_model.model.model.layers.{layer}.{(rename or {}).get(module, module)}"
            tensors[f"{key}.lora_A.weight"] = down
            tensors[f"{key}.lora_B.weight"] = up
            deltas[name] = (alpha / rank) * up.double() @ down.double()
    directory.mkdir()
    save_file(tensors, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "task_type": "CAUSAL_LM",
        "target_modules": [m.split(".")[-1] for m in modules], "bias": "none",
        "base_model_name_or_path": str(base_dir), "fan_in_fan_out": False}))
    return deltas


@pytest.mark.parametrize("method, calibrate", [
    ("task_arithmetic", False), ("ties", False), ("axis", True), ("tsv", False),
    ("iso_c", True), ("iso_cts", True),
])
def test_lora_sources_equal_their_dense_deltas(ray_cluster, float32_family, tmp_path, method,
                                               calibrate):
    base_dir = float32_family["base"]
    full = float32_family["sources"][0]
    lora_deltas = [write_lora(tmp_path / f"lora-{i}", base_dir, seed=i) for i in range(2)]
    out = tmp_path / "merged"
    recipe = {"base": str(base_dir),
              "sources": [str(full), str(tmp_path / "lora-0"), str(tmp_path / "lora-1")],
              "method": method_block(method, k=6, density=0.5, scale=0.8),
              "exclude": ["embed_tokens", "lm_head"], "runtime": {"svd": "exact"},
              "output": {"path": str(out)}}
    if calibrate:
        # SVC's s_i = ⟨a_m, a_i⟩ / max(‖a_i‖², 1e-12) divides by ‖a_i‖² ≈ 0 wherever a rank-3
        # adapter has no component; float32 rounding there is amplified (seen: 2e-4 relative),
        # so calibrated merges with LoRA sources are checked with float64 compute.
        recipe["calibrate"] = {"svc": {"alpha": "auto"}}
        recipe["runtime"]["compute_dtype"] = "float64"
    assert main(["merge", str(write_recipe(tmp_path / "r.yaml", recipe)), "--no-progress"]) == 0

    base, full_tensors, merged = load_tensors(base_dir), load_tensors(full), load_tensors(out)
    for name, base_tensor in base.items():
        sources = [full_tensors[name]] + [
            base_tensor.double() + deltas.get(name, torch.zeros(base_tensor.shape,
                                                                  dtype=torch.float64))
            for deltas in lora_deltas]
        if method in ("task_arithmetic", "ties"):
            expected = reference_merge(method, base_tensor, sources, [1.0] * 3, scale=0.8,
                                       density=0.5)
        else:
            expected = reference_spectral(method, name, base_tensor, sources, [1.0] * 3,
                                          scale=0.8, k=6, svc_alpha=1 / 3 if calibrate else None)
        expected_delta = expected - base_tensor.double()
        error = (merged[name].double() - base_tensor.double() - expected_delta).norm()
        relative = float(error / expected_delta.norm().clamp(min=1e-12))
        assert relative < 5e-5, f"{name}: {relative:.2e}"
    source = json.loads((out / "raymerge_manifest.json").read_text())["sources"][1]
    assert list(source["files"]) == ["adapter_model.safetensors"]


def test_factored_path_never_forms_the_full_matrix():
    """A 12000 × 12000 float32 delta would take 550 MiB; its rank-4 factors take 0.4 MiB."""
    size, rank = 12_000, 4
    generator = torch.Generator().manual_seed(0)
    factors = [(torch.randn(size, rank, generator=generator),
                torch.randn(size, rank, generator=generator)) for _ in range(3)]
    for name in ("axis", "tsv"):
        settings = method_settings({"name": name, **({"k": 8} if name == "axis" else {})})
        merger = build_method(settings, [1.0] * 3, MergeOptions())
        with PeakMemory() as memory:
            merger.begin("model.layers.0.mlp.up_proj.weight", torch.empty(size, size))
            for index, (left, right) in enumerate(factors):
                merger.update_factored(0, index, left, right)
        assert memory.peak_bytes < 100 * 2**20, (name, memory.peak_bytes)
    assert merger.stack_U and sum(u.shape[1] for u in merger.stack_U) == 3 * rank


def test_adapter_for_another_base_is_refused(float32_family, tmp_path, capsys):
    write_lora(tmp_path / "stray", float32_family["base"], seed=0,
               rename={"self_attn.q_proj": "self_attn.query"})
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "r.yaml", {
        "base": str(float32_family["base"]), "sources": [str(tmp_path / "stray")],
        "output": {"path": str(out)}})
    assert main(["merge", str(recipe)]) == 2
    error = capsys.readouterr().err
    assert "LoRA target model.layers.0.self_attn.query does not exist in the base" in error
    assert published(out) == []


def test_adapter_with_mismatched_factor_shapes_is_refused(float32_family, tmp_path, capsys):
    write_lora(tmp_path / "wide", float32_family["base"], seed=0)
    weights = load_tensors(tmp_path / "wide")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    weights[key] = torch.zeros(3, 40)
    save_file(weights, tmp_path / "wide" / "adapter_model.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "base": str(float32_family["base"]), "sources": [str(tmp_path / "wide")],
        "output": {"path": str(tmp_path / "merged")}})
    assert main(["merge", str(recipe)]) == 2
    assert "LoRA factors of model.layers.0.self_attn.q_proj are B [32, 3] and A [3, 40]" in \
        capsys.readouterr().err
