"""Every bad input gives one line naming the source, the tensor and the fix, exit status 2, and
publishes nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_tensors, published, write_recipe
from safetensors.torch import save_file

from raymerge.cli import main


def _copy_with(source: Path, target: Path, edit=None, config_edit=None) -> Path:
    """A single-file copy of a checkpoint with its tensors and config edited."""
    tensors = load_tensors(source)
    if edit:
        edit(tensors)
    target.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, target / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


def _merge_fails(tmp_path: Path, family: dict, bad_source: Path, capsys, *extra: str) -> str:
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(family["base"]),
        "sources": [str(family["sources"][0]), str(bad_source)],
        "output": {"path": str(out)},
    })
    status = main(["merge", str(recipe), "--no-progress", *extra])
    error = capsys.readouterr().err.strip()
    assert status == 2
    assert published(out) == [], "nothing may be published or left beside the output"
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    return error


FIRST_MATRIX = "model.layers.0.mlp.up_proj.weight"


def test_missing_source(tmp_path, float32_family, capsys):
    error = _merge_fails(tmp_path, float32_family, tmp_path / "nowhere", capsys)
    assert "source " in error and "nowhere: not found" in error


def test_missing_tensor(tmp_path, float32_family, capsys):
    bad = _copy_with(float32_family["sources"][1], tmp_path / "bad",
                     edit=lambda t: t.pop(FIRST_MATRIX))
    error = _merge_fails(tmp_path, float32_family, bad, capsys)
    assert f"tensor {FIRST_MATRIX} of the base is missing" in error and str(bad) in error


def test_extra_tensor(tmp_path, float32_family, capsys):
    bad = _copy_with(float32_family["sources"][1], tmp_path / "bad",
                     edit=lambda t: t.update({"score.weight": torch.zeros(2, 32)}))
    error = _merge_fails(tmp_path, float32_family, bad, capsys)
    assert "tensor score.weight is not in the base" in error


def test_shape_mismatch(tmp_path, float32_family, capsys):
    bad = _copy_with(float32_family["sources"][1], tmp_path / "bad",
                     edit=lambda t: t.update({FIRST_MATRIX: torch.zeros(40, 32)}))
    error = _merge_fails(tmp_path, float32_family, bad, capsys)
    assert f"tensor {FIRST_MATRIX} has shape [40, 32] but the base has [48, 32]" in error


def test_vocabulary_mismatch(tmp_path, float32_family, capsys):
    def grow_vocab(tensors):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = torch.cat([tensors[name], torch.zeros(4, 32)])

    bad = _copy_with(float32_family["sources"][1], tmp_path / "bad", edit=grow_vocab,
                     config_edit=lambda c: c.update(vocab_size=100))
    error = _merge_fails(tmp_path, float32_family, bad, capsys)
    assert "vocabulary size 100 differs from the base's 96" in error


def test_unsupported_dtype(tmp_path, float32_family, capsys):
    bad = _copy_with(float32_family["sources"][1], tmp_path / "bad",
                     edit=lambda t: t.update({FIRST_MATRIX: t[FIRST_MATRIX].to(torch.int8)}))
    error = _merge_fails(tmp_path, float32_family, bad, capsys)
    assert f"tensor {FIRST_MATRIX} has dtype I8" in error and "unquantized" in error


def test_float8_source_is_refused(tmp_path, float32_family, capsys):
    bad = _copy_with(float32_family["sources"][1], tmp_path / "bad", edit=lambda t: t.update(
        {FIRST_MATRIX: t[FIRST_MATRIX].to(torch.float8_e4m3fn)}))
    error = _merge_fails(tmp_path, float32_family, bad, capsys)
    assert f"source {bad}: tensor {FIRST_MATRIX} has dtype F8_E4M3" in error


def test_source_of_another_architecture_is_refused(tmp_path, float32_family, capsys):
    def other(config):
        config.update(model_type="mistral", architectures=["MistralForCausalLM"])

    bad = _copy_with(float32_family["sources"][1], tmp_path / "bad", config_edit=other)
    error = _merge_fails(tmp_path, float32_family, bad, capsys)
    assert f"source {bad}: model_type is 'mistral' but the base's is 'llama'" in error


def test_task_memory_too_small_for_a_unit_is_refused_before_merging(tmp_path, float32_family,
                                                                    capsys):
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(float32_family["base"]), "sources": [str(float32_family["sources"][0])],
        "runtime": {"memory": "20KB"}, "output": {"path": str(out)}})
    assert main(["merge", str(recipe), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert "needs about" in error and "per task (merging tensor model." in error
    assert "more than runtime.memory = 19.5 KiB; raise runtime.memory to at least" in error
    assert published(out) == []


def test_a_task_checks_its_unit_fits_before_allocating(float32_family):
    from raymerge.errors import RecipeError
    from raymerge.execute import MergeJob, merge_unit
    from raymerge.plan import make_plan
    from raymerge.recipe import method_settings
    from raymerge.sources import resolve_checkpoint

    base = resolve_checkpoint(str(float32_family["base"]))
    source = resolve_checkpoint(str(float32_family["sources"][0]))
    unit = make_plan(base, [source], output_dtype=None).units[1]
    job = MergeJob(base=base, sources=[source], weights=[1.0], method=method_settings({}),
                   memory=unit.peak_bytes - 1)
    with pytest.raises(RecipeError, match=f"unit {unit.name} needs about .* tensor "
                                          f"{unit.peak_tensor}"):
        merge_unit(job, unit)
    assert merge_unit(MergeJob(**{**job.__dict__, "memory": unit.peak_bytes}), unit)[0]["unit"] \
        == unit.index


def test_no_traceback_without_debug_and_one_with_it(tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", {"base": str(tmp_path / "nowhere"),
                                                      "sources": [str(tmp_path / "gone")]})
    plain = subprocess.run([sys.executable, "-m", "raymerge.cli", "merge", str(recipe)],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.strip().splitlines() == [
        f"raymerge: error: source {tmp_path / 'nowhere'}: not found; give an existing directory, "
        "s3://bucket/prefix, gs://bucket/prefix or a Hub id 'org/name[@revision]'"]
    debug = subprocess.run([sys.executable, "-m", "raymerge.cli", "--debug", "merge", str(recipe)],
                           capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr


def test_unreadable_header(tmp_path, float32_family, capsys):
    bad = _copy_with(float32_family["sources"][1], tmp_path / "bad")
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[8:20] = b"\xff" * 12  # the JSON header is now garbage
    (bad / "model.safetensors").write_bytes(bytes(data))
    error = _merge_fails(tmp_path, float32_family, bad, capsys)
    assert "corrupted safetensors header" in error and "model.safetensors" in error


@pytest.mark.parametrize("shape", ["[1e400]", "[Infinity]", "[true, 4]", '["8", 4]', "[2.5]"])
def test_header_whose_shape_is_not_integers(tmp_path, float32_family, capsys, shape):
    bad = _copy_with(float32_family["sources"][1], tmp_path / "bad")
    path = bad / "model.safetensors"
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header[FIRST_MATRIX]["shape"] = "SHAPE"
    text = json.dumps(header).replace('"SHAPE"', shape).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
    error = _merge_fails(tmp_path, float32_family, bad, capsys)
    assert "corrupted safetensors header entry" in error and FIRST_MATRIX in error


def test_header_pointing_past_end_of_file(tmp_path, float32_family, capsys):
    bad = _copy_with(float32_family["sources"][1], tmp_path / "bad")
    path = bad / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])  # truncated download
    error = _merge_fails(tmp_path, float32_family, bad, capsys)
    assert "points past the end of the file" in error


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_nan_or_inf_in_source_found_while_streaming(ray_cluster, tmp_path, float32_family, capsys,
                                                    value):
    def poison(tensors):
        tensors[FIRST_MATRIX][3, 4] = value

    bad = _copy_with(float32_family["sources"][1], tmp_path / "bad", edit=poison)
    error = _merge_fails(tmp_path, float32_family, bad, capsys)
    assert f"source {bad}: tensor {FIRST_MATRIX} contains NaN or Inf" in error


def test_pickle_source_refused_unless_allowed(ray_cluster, tmp_path, float32_family, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(load_tensors(float32_family["sources"][1]), pickled / "pytorch_model.bin")
    shutil.copy(float32_family["sources"][1] / "config.json", pickled)
    error = _merge_fails(tmp_path, float32_family, pickled, capsys)
    assert "pickle checkpoint" in error and "--allow-pickle" in error

    out = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "recipe.yaml"), "--no-progress", "--allow-pickle"]) == 0
    reference = tmp_path / "reference"
    write_recipe(tmp_path / "ref.yaml", {
        "base": str(float32_family["base"]),
        "sources": [str(float32_family["sources"][0]), str(float32_family["sources"][1])],
        "output": {"path": str(reference)},
    })
    assert main(["merge", str(tmp_path / "ref.yaml"), "--no-progress"]) == 0
    merged, expected = load_tensors(out), load_tensors(reference)
    assert all(torch.equal(merged[name], expected[name]) for name in expected)


def test_output_inside_a_source_is_refused(tmp_path, float32_family, capsys):
    out = float32_family["sources"][0] / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(float32_family["base"]), "sources": [str(float32_family["sources"][0])],
        "output": {"path": str(out)},
    })
    assert main(["merge", str(recipe)]) == 2
    assert "overlaps input directory" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("recipe, message", [
    ({"base": "b", "sources": ["s"], "methd": {}}, "methd: Extra inputs are not permitted"),
    ({"base": "b", "sources": []}, "sources: List should have at least 1 item"),
    ({"base": "b", "sources": ["s"], "method": {"name": "ties", "density": 1.5}},
     "method.density: Input should be less than or equal to 1"),
    ({"base": "b", "sources": ["s"], "method": {"name": "sleep"}}, "unknown method 'sleep'"),
    ({"base": "b", "sources": ["s"], "method": {"name": "axis", "k": 0}},
     "method.k: k must be a positive integer"),
    ({"base": "b", "sources": ["s"], "method": {"name": "axis", "k": 1.5}},
     "method.k: k must be a positive integer, or a fraction in (0, 1]"),
    ({"base": "b", "sources": ["s"], "method": {"name": "dare", "p": 1.0}}, "method.p:"),
    ({"base": "b", "sources": ["s"], "method": {"name": "axis", "density": 0.2}},
     ("method: axis does not take 'density' (a key of breadcrumbs, breadcrumbs_ties, dare_ties, "
      "della, della_linear, ties); axis takes: scale, seed, k")),
    ({"base": "b", "sources": ["s"], "method": {"name": "ties", "denstiy": 0.2}},
     "method: ties does not take 'denstiy'; ties takes: scale, density"),
    ({"base": "b", "sources": [{"path": "s", "parameters": {"density": 0.5}}],
      "method": {"name": "dare"}},
     "sources.0.parameters: 'density' cannot be set per source for method dare"),
    ({"base": "b", "sources": [{"path": "s", "parameters": {"density": 2}}],
      "method": {"name": "ties"}},
     "sources.0.parameters.density: Input should be less than or equal to 1"),
    ({"base": "b", "sources": ["s"], "output": {"shard_size": "lots"}}, "not a size: 'lots'"),
])
def test_bad_recipe_points_at_the_key(tmp_path, capsys, recipe, message):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    assert main(["merge", str(path)]) == 2
    error = capsys.readouterr().err
    assert message in error and str(path) in error and len(error.strip().splitlines()) == 1


def test_failed_merge_leaves_no_writer_actor_on_the_cluster(ray_cluster, tmp_path,
                                                           float32_family, capsys):
    import time

    import ray

    from raymerge.distributed.writer import WRITER_NAMESPACE, writer_name
    from raymerge.output.staging import Staging

    def poison(tensors):
        tensors[FIRST_MATRIX][0, 0] = float("inf")

    bad = _copy_with(float32_family["sources"][1], tmp_path / "bad", edit=poison)
    _merge_fails(tmp_path, float32_family, bad, capsys)
    name = writer_name(Staging(tmp_path / "merged").path)
    deadline = time.monotonic() + 10
    while True:  # ray.kill is asynchronous
        try:
            ray.get_actor(name, namespace=WRITER_NAMESPACE)
        except ValueError:
            break
        assert time.monotonic() < deadline, f"{name} still alive after a failed merge"
        time.sleep(0.2)


def test_a_second_merge_into_an_output_being_written_is_refused(ray_cluster, tmp_path,
                                                               float32_family, capsys):
    import ray

    from raymerge.distributed.writer import WRITER_NAMESPACE, writer_name
    from raymerge.output.staging import Staging

    staging = Staging(tmp_path / "merged").path
    staging.mkdir()
    (staging / "partial.safetensors").write_bytes(b"the first merge's bytes")

    @ray.remote(num_cpus=0)
    class Busy:  # stands for the first merge's writer actor
        def ping(self) -> bool:
            return True

        def merge_key(self) -> str:
            return "the first merge"

    busy = Busy.options(name=writer_name(staging), namespace=WRITER_NAMESPACE).remote()
    ray.get(busy.ping.remote())
    try:
        recipe = write_recipe(tmp_path / "recipe.yaml", {
            "base": str(float32_family["base"]), "sources": [str(float32_family["sources"][0])],
            "output": {"path": str(tmp_path / "merged")}})
        assert main(["merge", str(recipe), "--no-progress"]) == 2
        assert "another merge is writing merged on this cluster" in capsys.readouterr().err
        assert (staging / "partial.safetensors").read_bytes() == b"the first merge's bytes"
    finally:
        ray.kill(busy)
