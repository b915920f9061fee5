"""The `ray job submit` entrypoints run the library on the job's cluster."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from helpers import load_tensors, write_recipe


def test_merge_pipeline_merges_a_recipe(ray_cluster, float32_family, tmp_path, monkeypatch,
                                        capsys):
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(float32_family["base"]), "sources": [str(float32_family["sources"][0])]})
    monkeypatch.setattr(sys, "argv", ["merge.py", str(recipe), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(Path(__file__).parents[1] / "pipelines" / "merge.py"),
                       run_name="__main__")
    assert exit_info.value.code == 0
    assert set(load_tensors(out)) == set(load_tensors(float32_family["base"]))
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["status"] == "ok" and record["output"] == str(out.resolve())
    assert record["sources"] == [{"source": str(float32_family["sources"][0]), "revision": None}]
    assert record["read_bytes"] > 0 and record["seconds"] > 0


def test_merge_pipeline_failure_ends_with_an_error_record(ray_cluster, tmp_path, monkeypatch,
                                                         capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", {"base": str(tmp_path / "missing"),
                                                      "sources": [str(tmp_path / "gone")]})
    monkeypatch.setattr(sys, "argv", ["merge.py", str(recipe)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(Path(__file__).parents[1] / "pipelines" / "merge.py"),
                       run_name="__main__")
    assert exit_info.value.code == 2
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["status"] == "error" and "missing: not found" in record["error"]
