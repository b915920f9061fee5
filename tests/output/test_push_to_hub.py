"""push_to_hub runs only after the local output is complete; its failure says what to do."""

from __future__ import annotations

import huggingface_hub.constants
from helpers import write_recipe

from raymerge.cli import main


def test_failed_push_keeps_the_complete_local_output(ray_cluster, float32_family, tmp_path,
                                                     capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(float32_family["base"]), "sources": [str(float32_family["sources"][0])],
        "output": {"path": str(out), "push_to_hub": "org/merged-model"}})
    assert main(["merge", str(recipe), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert f"output is complete at {out}, but pushing it to the Hub as org/merged-model failed" \
        in error
    assert f"hf upload org/merged-model {out}" in error and len(error.splitlines()) == 1
    assert (out / "model.safetensors.index.json").exists()
    assert (out / "raymerge_manifest.json").exists()
