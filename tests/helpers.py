"""Small helpers the tests share."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from raymerge.sources.checkpoint import Checkpoint, read_tensor


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint.open(str(directory), directory)
    return {name: read_tensor(info) for name, info in checkpoint.tensors.items()}


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def published(directory: Path) -> list[str]:
    """Everything raymerge may have left at or beside an output path."""
    return sorted(p.name for p in directory.parent.iterdir() if p.name.lstrip(".").startswith(
        directory.name))


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every shard and spectral-factor file (the manifest holds timings)."""
    files = [*directory.glob("*.safetensors"), *directory.glob("spectral_factors/*"),
             directory / "model.safetensors.index.json"]
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(files)}


def manifest(directory: Path) -> dict:
    return json.loads((directory / "raymerge_manifest.json").read_text())


def assert_merged_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """float32: to ~1e-6 relative. bfloat16: the float64 reference rounded once may sit one
    bfloat16 step from the float32-streamed result, never more (plus 1e-6 absolute, for entries
    that cancel to ~0)."""
    actual, expected64 = actual.double(), expected.double()
    if expected.dtype == torch.bfloat16:
        magnitude = torch.maximum(actual.abs(), expected64.abs()).clamp(min=2.0**-126)
        one_step = torch.exp2(torch.floor(torch.log2(magnitude)) - 7)
        excess = (actual - expected64).abs() - one_step - 1e-6
        assert excess.max() <= 0, f"{name}: {int((excess > 0).sum())} entries off by > 1 step"
    else:
        torch.testing.assert_close(actual, expected64, rtol=1e-5, atol=1e-6,
                                   msg=lambda detail: f"{name}: {detail}")


def compare_with_float64(actual: torch.Tensor, expected: torch.Tensor, base: torch.Tensor,
                         name: str, compute_dtype: str, errors: dict[str, float]) -> None:
    """A float32-written merged weight against a float64 reference: a float64-compute merge
    within one float32 step of the rounded reference (asserted here); a float32-compute one's
    relative error on the delta, recorded in `errors` for the caller's tolerance."""
    if compute_dtype == "float64":
        rounded = expected.float()
        one_step = (torch.nextafter(rounded, torch.tensor(float("inf"))) - rounded).abs()
        off = (actual - rounded).abs()
        assert bool((off <= one_step).all()), f"{name}: {float(off.max()):.2e} off"
        return
    expected_delta = expected - base.double()
    errors[name] = float((actual.double() - expected).norm()) / max(
        float(expected_delta.norm()), 1e-12)


def axis_merge_of(family: dict, root: Path, sources: int, k: int) -> Path:
    """`raymerge merge` of the family's first `sources` fine-tunes with AXIS into root/merged."""
    from raymerge.cli import main

    merged = root / "merged"
    recipe = write_recipe(root / "axis-recipe.yaml", {
        "base": str(family["base"]), "sources": [str(p) for p in family["sources"][:sources]],
        "method": {"name": "axis", "k": k}, "output": {"path": str(merged)}})
    assert main(["merge", str(recipe), "--no-progress"]) == 0
    return merged


def method_block(name: str, **candidates) -> dict:
    """A recipe's method block for `name` with those of `candidates` the method takes (a key of
    another method is an error, so tests that loop over methods keep only the method's own)."""
    from raymerge.settings import method_settings_class

    fields = method_settings_class(name).model_fields
    return {"name": name, **{key: value for key, value in candidates.items() if key in fields}}


def weighted_merge(tmp_path: Path, base: Path, sources: list[Path], weights: list[float],
                   method: dict, calibrate: bool, runtime: dict) -> Path:
    """`raymerge merge` of weighted sources into tmp_path/merged, embeddings and head excluded
    from the method (merged as the mean), SVC with alpha auto when `calibrate`."""
    from raymerge.cli import main

    out = tmp_path / "merged"
    recipe = {
        "base": str(base),
        "sources": [{"path": str(p), "weight": w} for p, w in zip(sources, weights)],
        "method": method,
        "output": {"path": str(out)},
        "exclude": ["embed_tokens", "lm_head"],
        "runtime": runtime,
    }
    if calibrate:
        recipe["calibrate"] = {"svc": {"alpha": "auto"}}
    assert main(["merge", str(write_recipe(tmp_path / "recipe.yaml", recipe)),
                 "--no-progress"]) == 0
    return out
