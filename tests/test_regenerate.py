"""`raymerge regenerate`: skip what is unchanged, re-merge what changed, reuse cached factors."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import yaml
from helpers import manifest, published

from raymerge.cli import main
from raymerge.synthetic import write_finetune

SPECTRAL_MATRICES = 3 * 7  # TINY_LLAMA: 3 blocks of q, k, v, o, gate, up, down


def write_registry(path: Path, models: list[dict], **extra) -> Path:
    path.write_text(yaml.safe_dump({**extra, "models": models}, sort_keys=False))
    return path


def axis_recipe(base: Path, sources: list[Path], out: Path) -> dict:
    return {"base": str(base), "sources": [str(p) for p in sources],
            "method": {"name": "axis", "k": 6}, "calibrate": {"svc": {"alpha": "auto"}},
            "output": {"path": str(out)}}


def run_json(argv: list[str], capsys) -> tuple[int, list[dict]]:
    code = main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    return code, [json.loads(line) for line in lines if line.startswith("{")]


def shard_bytes(directory: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(directory.glob("*.safetensors"))]


def test_regenerate_skips_unchanged_and_recomputes_only_a_new_source(
        ray_cluster, float32_family, tmp_path, capsys):
    base, sources = float32_family["base"], float32_family["sources"]
    out = tmp_path / "team-merge"
    cache = tmp_path / "factors"
    recipe_path = tmp_path / "team.yaml"
    recipe_path.write_text(yaml.safe_dump(axis_recipe(base, sources[:3], out)))
    registry = write_registry(tmp_path / "registry.yaml",
                              [{"name": "team", "recipe": "team.yaml"}], factor_cache=str(cache))

    code, (first, run) = run_json(["regenerate", str(registry), "--json"], capsys)
    assert code == 0 and run == {"status": "ok", "failed": [], "models": {"team": "merged"}}
    assert first["factor_cache_hits"] == 0
    assert first["factor_cache_misses"] == 3 * SPECTRAL_MATRICES
    assert first["sources"][str(sources[0])].startswith("sha256:")
    assert manifest(out)["submission_id"] == first["submission_id"]
    published_at = (out / "raymerge_manifest.json").stat().st_mtime_ns

    code, (second, _) = run_json(["regenerate", str(registry), "--json"], capsys)
    assert code == 0 and second["status"] == "unchanged"
    assert second["submission_id"] == first["submission_id"]
    assert (out / "raymerge_manifest.json").stat().st_mtime_ns == published_at

    recipe_path.write_text(yaml.safe_dump(axis_recipe(base, sources[:4], out)))
    code, (third, _) = run_json(["regenerate", str(registry), "--json"], capsys)
    assert code == 0 and third["status"] == "merged"
    assert third["submission_id"] != first["submission_id"]
    assert (third["factor_cache_hits"], third["factor_cache_misses"]) == \
        (3 * SPECTRAL_MATRICES, SPECTRAL_MATRICES)

    # The cached factors are exactly what a merge without the cache computes.
    uncached = tmp_path / "uncached"
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(axis_recipe(base, sources[:4], uncached)))
    assert main(["merge", str(plain), "--no-progress"]) == 0
    assert shard_bytes(out) == shard_bytes(uncached)
    assert published(out) == ["team-merge"]  # no staging directory or progress log left


def test_a_changed_source_file_changes_the_identity_and_is_remerged(
        ray_cluster, float32_family, tmp_path, capsys):
    base = float32_family["base"]
    source = write_finetune(base, tmp_path / "ft", seed=7, strength=0.2, noise=0.01)
    registry = write_registry(tmp_path / "registry.yaml", [{
        "name": "m", "output": str(tmp_path / "out"),
        "recipe": {"base": str(base), "sources": [str(source)], "method": {"name": "ties"}}}])
    _, (first, _) = run_json(["regenerate", str(registry), "--json"], capsys)
    write_finetune(base, source, seed=8, strength=0.2, noise=0.01)  # a new fine-tune lands
    _, (second, _) = run_json(["regenerate", str(registry), "--json"], capsys)
    assert first["status"] == second["status"] == "merged"
    assert first["sources"][str(source)] != second["sources"][str(source)]
    _, (third, _) = run_json(["regenerate", str(registry), "--json", "--dry-run"], capsys)
    assert third["status"] == "unchanged"
    _, (forced, _) = run_json(["regenerate", str(registry), "--json", "--force",
                               "--dry-run"], capsys)
    assert forced["status"] == "would-merge"


def test_a_duplicate_of_a_merge_being_written_is_a_no_op(ray_cluster, float32_family,
                                                         tmp_path, capsys):
    import ray

    from raymerge.distributed.writer import WRITER_NAMESPACE, writer_name
    from raymerge.merge import layout_and_key, prepare
    from raymerge.output.staging import Staging
    from raymerge.recipe import recipe_from_dict

    recipe = {"base": str(float32_family["base"]),
              "sources": [str(float32_family["sources"][0])],
              "output": {"path": str(tmp_path / "out")}}
    prepared = prepare(recipe_from_dict(recipe))
    key = layout_and_key(prepared)[1]

    @ray.remote(num_cpus=0)
    class FirstSubmission:  # stands for the writer of the same merge, submitted earlier
        def merge_key(self) -> str:
            return key

    first = FirstSubmission.options(name=writer_name(Staging(prepared.target).path),
                                    namespace=WRITER_NAMESPACE).remote()
    try:
        registry = write_registry(tmp_path / "registry.yaml", [{"name": "m", "recipe": recipe}])
        code, (record, run) = run_json(["regenerate", str(registry), "--json"], capsys)
    finally:
        ray.kill(first)
    assert code == 0 and record["status"] == "running" and run["status"] == "ok"
    assert not (tmp_path / "out").exists()


def test_one_failing_model_does_not_stop_the_others(ray_cluster, float32_family, tmp_path,
                                                    capsys, monkeypatch):
    good = {"base": str(float32_family["base"]), "sources": [str(float32_family["sources"][1])],
            "output": {"path": str(tmp_path / "good")}}
    bad = {**good, "sources": [str(tmp_path / "missing")], "output": {"path": str(tmp_path / "b")}}
    registry = write_registry(tmp_path / "registry.yaml",
                              [{"name": "bad", "recipe": bad}, {"name": "good", "recipe": good}])
    monkeypatch.setattr(sys, "argv", ["regenerate.py", str(registry)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(Path(__file__).parents[1] / "pipelines" / "regenerate.py"),
                       run_name="__main__")
    assert exit_info.value.code == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()
             if line.startswith("{")]
    assert lines[0]["status"] == "error" and "missing: not found" in lines[0]["error"]
    assert lines[1]["status"] == "merged" and (tmp_path / "good" / "config.json").exists()
    assert lines[2] == {"status": "error", "failed": ["bad"],
                        "models": {"bad": "error", "good": "merged"}}
    assert not (tmp_path / "b").exists()


def test_a_crashing_model_is_reported_and_the_next_one_merges(ray_cluster, float32_family,
                                                             tmp_path, capsys, monkeypatch):
    """Not only raymerge's own errors: a model whose merge crashes (a bug, a library's error)
    is reported with its exception and the run goes on to the next model, then exits 1."""
    import raymerge.merge

    real = raymerge.merge.run_merge

    def crashing(prepared, **kwargs):
        if prepared.target.name == "crash":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(prepared, **kwargs)

    monkeypatch.setattr(raymerge.merge, "run_merge", crashing)
    good = {"base": str(float32_family["base"]), "sources": [str(float32_family["sources"][1])],
            "output": {"path": str(tmp_path / "good")}}
    crash = {**good, "output": {"path": str(tmp_path / "crash")}}
    registry = write_registry(tmp_path / "registry.yaml", [{"name": "crash", "recipe": crash},
                                                           {"name": "good", "recipe": good}])
    code, lines = run_json(["regenerate", str(registry), "--json"], capsys)
    assert code == 1
    assert lines[0]["status"] == "error" and "crash: the merge crashed (RuntimeError: CUDA " \
        "error: an illegal memory access" in lines[0]["error"]
    assert lines[1]["status"] == "merged" and (tmp_path / "good" / "config.json").exists()
    assert lines[2]["models"] == {"crash": "error", "good": "merged"}


@pytest.mark.parametrize("registry, message", [
    ({"models": [{"name": "a", "recipe": "a.yaml", "outptu": "x"}]}, "models.0.outptu: Extra"),
    ({"models": [{"name": "a", "recipe": "a.yaml"}, {"name": "a", "recipe": "b.yaml"}]},
     "model names must be unique; repeated: a"),
    ({"models": []}, "models: List should have at least 1 item"),
    ("!!python/object/apply:os.system ['true']", "is not valid YAML"),
])
def test_bad_registries_fail_in_one_line(tmp_path, capsys, registry, message):
    path = tmp_path / "registry.yaml"
    path.write_text(registry if isinstance(registry, str) else yaml.safe_dump(registry))
    assert main(["regenerate", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
