"""The σ-tuning Ray Train job: 2 CPU workers lower the held-out loss, only σ changes, the folded
checkpoint computes what the spectral model computes, and a failed worker resumes."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import axis_merge_of, load_tensors

from raymerge.tune.config import TuneConfig
from raymerge.tune.job import run_tune
from raymerge.tune.train import build_spectral_model


@pytest.fixture(scope="module")
def axis_merge(ray_cluster, float32_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    merged = axis_merge_of(float32_family, root, sources=3, k=8)
    generator = random.Random(0)
    lines = []
    for _ in range(600):  # counting sequences: a pattern σ alone can partly fit
        start = generator.randrange(0, 70)
        lines.append(json.dumps({"text": " ".join(f"w{start + i}" for i in range(20))}))
    (root / "data").mkdir()
    data = root / "data" / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return {"root": root, "merged": merged, "base": float32_family["base"], "data": data}


def _settings(axis_merge, tmp_path, **overrides) -> TuneConfig:
    return TuneConfig.model_validate({
        "merged": str(axis_merge["merged"]), "base": str(axis_merge["base"]),
        "data": {"train": str(axis_merge["data"]), "eval_fraction": 0.2},
        "n": 6, "optimizer": {"lr": 0.05}, "epochs": 2, "batch_size": 8, "seq_len": 16,
        "num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 1,
        "output": str(tmp_path / "tuned"), "storage_path": str(tmp_path / "runs"),
        **overrides})


def test_two_workers_lower_the_loss_change_only_sigma_and_resume_after_a_failure(axis_merge,
                                                                                tmp_path):
    """One run carries both: a Ray Train start costs ~40 s on 2 CPUs."""
    marker = tmp_path / "failed-once"
    settings = _settings(axis_merge, tmp_path, epochs=3, max_steps=5)
    report = run_tune(settings, extra_loop_config={"fail_once_marker": str(marker),
                                                   "fail_at_epoch": 1})
    assert marker.exists(), "the injected failure happened"
    assert report["starts"] == 2  # the restarted workers began from the epoch-0 checkpoint
    assert report["steps"] == 15  # epochs 0, 1, 2 once each: epoch 0 was not redone
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert report["trainable_parameters"] == 6 * len(report["sigmas"])

    merged, tuned = load_tensors(axis_merge["merged"]), load_tensors(tmp_path / "tuned")
    changed = {name for name in merged if not torch.equal(merged[name], tuned[name])}
    assert changed and changed <= set(report["sigmas"])  # only the AXIS matrices moved

    from transformers import AutoModelForCausalLM

    model, swapped = build_spectral_model(settings)
    with torch.no_grad():
        for name, layer in swapped.items():
            layer.sigma.copy_(report["sigmas"][name][: layer.sigma.numel()])
        tokens = torch.tensor([[5, 6, 7, 8, 9, 10]])
        expected = model(tokens).logits
        folded = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")(tokens).logits
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-4)
    card = (tmp_path / "tuned" / "README.md").read_text()
    assert "before" in card and f"{report['eval_loss_after']:.4f}" in card


def _tune_yaml(axis_merge, tmp_path, **overrides):
    """A TUNE.yaml with the README's defaults for workers and CPUs unless overridden."""
    from helpers import write_recipe

    return write_recipe(tmp_path / "tune.yaml", {
        "merged": str(axis_merge["merged"]), "base": str(axis_merge["base"]),
        "data": {"train": str(axis_merge["data"]), "eval_fraction": 0.2},
        "n": 4, "epochs": 1, "max_steps": 2, "batch_size": 8, "seq_len": 16,
        "output": str(tmp_path / "tuned"), "storage_path": str(tmp_path / "runs"), **overrides})


def test_the_readme_defaults_finish_and_a_rerun_from_s3_continues(axis_merge, s3_server,
                                                                   tmp_path, capsys):
    """Merged model, base, data, Ray Train's storage_path and the tuned outputs all in S3, as a
    nightly job on a cluster sharing nothing but the store: a rerun with the same name continues
    from the checkpoint Ray Train left there."""
    from pyarrow import fs

    from raymerge.cli import main
    from raymerge.tune.config import load_tune_config

    bucket = "tuning"
    for name, local in (("merged", axis_merge["merged"]), ("base", axis_merge["base"])):
        s3_server.upload_directory(local, f"{bucket}/{name}")
    s3_server.upload_directory(axis_merge["data"].parent, f"{bucket}/data")
    in_s3 = {"merged": f"s3://{bucket}/merged", "base": f"s3://{bucket}/base",
             "data": {"train": f"s3://{bucket}/data/train.jsonl", "eval_fraction": 0.2},
             "storage_path": f"s3://{bucket}/runs", "run_name": "continued",
             "storage": {"endpoint": s3_server.endpoint_url}}
    config = _tune_yaml(axis_merge, tmp_path, **in_s3, output=f"s3://{bucket}/tuned")
    settings = load_tune_config(config)
    assert (settings.num_workers, settings.cpus_per_worker) == (2, None)  # the defaults
    assert main(["tune", str(config)]) == 0  # the session cluster has 2 CPUs
    assert "2 steps" in capsys.readouterr().out
    store = s3_server.filesystem()
    with store.open_input_stream(f"{bucket}/tuned/raymerge_manifest.json") as stream:
        first = json.loads(stream.read())["tuning"]
    assert (first["epochs"], first["starts"], first["steps"]) == (1, 1, 2)
    stored = {info.path for info in store.get_file_info(fs.FileSelector(bucket, recursive=True))}
    assert any(path.startswith(f"{bucket}/runs/continued/") and path.endswith("sigma.safetensors")
               for path in stored)  # Ray Train's checkpoint is in the store
    assert f"{bucket}/tuned/model.safetensors.index.json" in stored
    assert not any("raymerge-staging" in path for path in stored)

    again = run_tune(load_tune_config(_tune_yaml(axis_merge, tmp_path, **in_s3, epochs=2,
                                                 output=str(tmp_path / "tuned-2"))))
    assert (again["epochs"], again["starts"], again["steps"]) == (2, 2, 4)
    assert again["eval_loss_before"] == first["eval_loss_before"]
    assert (tmp_path / "tuned-2" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("overrides, expected", [
    ({"cpus_per_worker": 4}, "cpus_per_worker asks for 4 CPU and no node has more than 2 CPU"),
    ({"num_workers": 3, "cpus_per_worker": 1}, "together it needs 3.5 CPU"),
    ({"use_gpu": True}, "use_gpu asks for 1 GPU and no node has more than 0 GPU"),
])
def test_a_tune_the_cluster_can_never_hold_fails_at_once(axis_merge, tmp_path, capsys,
                                                         overrides, expected):
    import time

    from raymerge.cli import main

    started = time.monotonic()
    assert main(["tune", str(_tune_yaml(axis_merge, tmp_path, **overrides))]) == 2
    assert time.monotonic() - started < 30
    # only raymerge's own line (the session cluster may forward an earlier job's actor logs)
    [error] = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("raymerge:")]
    assert "the tuning job" in error and expected in error
    assert not (tmp_path / "tuned").exists()


def test_tune_on_a_checkpoint_without_a_tokenizer_is_one_line(axis_merge, tmp_path, capsys):
    import shutil

    from raymerge.cli import main

    bare = tmp_path / "bare"
    shutil.copytree(axis_merge["merged"], bare,
                    ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    assert main(["tune", str(_tune_yaml(axis_merge, tmp_path, merged=str(bare)))]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"merged {bare} has no usable tokenizer" in error
    assert "copy the base model's tokenizer files" in error
