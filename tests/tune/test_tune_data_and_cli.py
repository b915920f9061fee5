"""Tuning data (packing, response-only loss) and `raymerge tune` from a YAML file."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import axis_merge_of, write_recipe

from raymerge.cli import main
from raymerge.tune.data import IGNORE, Packer


def test_packer_cuts_fixed_rows_and_masks_prompts(float32_family):
    packer = Packer(str(float32_family["base"]), seq_len=4)
    rows = packer({"text": ["w1 w2 w3", "w4 w5 w6 w7 w8"]})
    assert rows["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert (rows["labels"] == rows["input_ids"]).all()

    pairs = Packer(str(float32_family["base"]), seq_len=5, prompt_column="q",
                   response_column="a")({"q": ["w1 w2", "w3"], "a": ["w9", "w8 w7"]})
    assert pairs["input_ids"].tolist() == [[1, 2, 9, 3, 8]]
    assert pairs["labels"].tolist() == [[IGNORE, IGNORE, 9, IGNORE, 8]]


def test_tune_command_with_parquet_prompt_response_in_local_mode(ray_cluster, float32_family,
                                                                 tmp_path, capsys):
    merged = axis_merge_of(float32_family, tmp_path, sources=2, k=4)
    prompts = [" ".join(f"w{i + j}" for j in range(6)) for i in range(60)]
    answers = [f"w{i + 6} w{i + 7}" for i in range(60)]
    pq.write_table(pa.table({"q": prompts, "a": answers}), tmp_path / "train.parquet")
    config = write_recipe(tmp_path / "tune.yaml", {
        "merged": str(merged), "base": str(float32_family["base"]),
        "data": {"train": str(tmp_path / "train.parquet"), "prompt_column": "q",
                 "response_column": "a", "eval_fraction": 0.25},
        "n": 0.5, "epochs": 1, "max_steps": 3, "batch_size": 4, "seq_len": 16,
        "num_workers": 0, "output": str(tmp_path / "tuned"),
        "storage_path": str(tmp_path / "runs")})
    capsys.readouterr()
    assert main(["tune", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "tuned" in printed and "held-out loss" in printed and "3 steps" in printed
    assert (tmp_path / "tuned" / "model.safetensors.index.json").exists()


def test_tune_config_errors_point_at_the_key(tmp_path, capsys):
    config = write_recipe(tmp_path / "tune.yaml", {
        "merged": "m", "base": "b", "data": {"train": "t", "prompt_column": "q"}, "lr": 1})
    assert main(["tune", str(config)]) == 2
    error = capsys.readouterr().err
    assert "prompt_column and response_column go together" in error and "lr" in error

