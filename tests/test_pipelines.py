"""The `ray job submit` entrypoints run the library on the job's cluster."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
from helpers import load_tensors, write_recipe


def test_merge_pipeline_merges_a_recipe(ray_cluster, float32_family, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(float32_family["base"]), "sources": [str(float32_family["sources"][0])]})
    monkeypatch.setattr(sys, "argv", ["merge.py", str(recipe), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(Path(__file__).parents[1] / "pipelines" / "merge.py"),
                       run_name="__main__")
    assert exit_info.value.code == 0
    assert set(load_tensors(out)) == set(load_tensors(float32_family["base"]))
