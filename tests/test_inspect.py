"""`raymerge inspect`: tensors of any checkpoint; merge statistics and spectra of an output."""

from __future__ import annotations

import pyarrow.parquet as pq
from helpers import write_recipe

from raymerge.cli import main


def test_inspect_a_calibrated_axis_merge_and_plot_its_spectra(ray_cluster, nine_sources,
                                                              tmp_path, capsys):
    base, sources = nine_sources
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(base), "sources": [str(p) for p in sources[:3]],
        "method": {"name": "axis", "k": 5}, "calibrate": {"svc": {"alpha": 0.2}},
        "output": {"path": str(out)}})
    assert main(["merge", str(recipe), "--no-progress"]) == 0
    capsys.readouterr()

    table = pq.read_table(out / "raymerge_stats.parquet").to_pylist()
    row = next(r for r in table if r["tensor"] == "model.layers.2.mlp.up_proj.weight")
    assert row["axis_rank"] == 5 and sum(row["axis_selected_per_source"]) == 5
    assert len(row["spectrum_before"]) == 5 and len(row["spectrum_after"]) == 5
    assert row["svc_gamma_min"] <= row["svc_gamma_median"] <= row["svc_gamma_max"]
    norm = next(r for r in table if r["tensor"] == "model.norm.weight")
    assert norm["axis_rank"] is None and norm["spectrum_before"] is None

    plot = tmp_path / "spectra.png"
    assert main(["inspect", str(out), "--tensors", "layers.2.mlp", "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "axis of 3 sources" in printed
    assert "model.layers.2.mlp.up_proj.weight" in printed and "model.layers.1" not in printed
    assert "plotted 3 tensors" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_plain_checkpoint_lists_tensors_and_refuses_plot(float32_family, tmp_path,
                                                                 capsys):
    assert main(["inspect", str(float32_family["base"]), "--tensors", "embed"]) == 0
    printed = capsys.readouterr().out
    assert "model.embed_tokens.weight" in printed and "[96, 32]" in printed
    assert main(["inspect", str(float32_family["base"]), "--plot", str(tmp_path / "x.png")]) == 2
    assert "has no raymerge_stats.parquet" in capsys.readouterr().err
