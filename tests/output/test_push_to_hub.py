"""push_to_hub runs only after the local output is complete; its failure says what to do."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import huggingface_hub.constants
import pytest
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


class FakeHub:
    """Stands in for huggingface_hub.HfApi; records calls and what the folder held."""

    calls: list = []

    def create_repo(self, repo_id, exist_ok, repo_type, private):
        self.calls.append(("create_repo", repo_id, private))

    def upload_folder(self, folder_path, repo_id, repo_type, commit_message,
                      commit_description):
        folder = Path(folder_path)
        self.calls.append(("upload_folder", repo_id, commit_message, commit_description,
                           sorted(p.name for p in folder.iterdir()),
                           sorted(p.name for p in folder.parent.iterdir())))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123")


@pytest.mark.parametrize("private", [None, False])
def test_push_is_one_commit_naming_recipe_and_sources_after_the_output_is_complete(
        ray_cluster, float32_family, tmp_path, capsys, monkeypatch, private):
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    out = tmp_path / "merged"
    sources = [str(p) for p in float32_family["sources"][:2]]
    output = {"path": str(out), "push_to_hub": "org/merged-model"}
    if private is not None:
        output["private"] = private
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(float32_family["base"]), "sources": sources, "output": output})
    assert main(["merge", str(recipe), "--no-progress", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    (create, repo, is_private), upload = FakeHub.calls
    assert (create, repo, is_private) == ("create_repo", "org/merged-model", private is None)
    _, repo, title, description, files, beside = upload
    manifest = json.loads((out / "raymerge_manifest.json").read_text())
    assert title == f"raymerge task_arithmetic merge {manifest['submission_id']}"
    assert f"recipe sha256: {recipe_digest_of(out, manifest)}" in description
    for source in [str(float32_family["base"]), *sources]:
        assert f"{source} = {manifest['identities'][source]}" in description
        assert manifest["identities"][source].startswith("sha256:")
    # uploaded only once complete: published, nothing staged beside it, no progress log
    assert {"raymerge_manifest.json", "model.safetensors.index.json", "config.json",
            "README.md"} <= set(files) and "raymerge_progress.jsonl" not in files
    assert beside == ["merged", "recipe.yaml"]
    assert record["submission_id"] == manifest["submission_id"]


def recipe_digest_of(out: Path, manifest: dict) -> str:
    from raymerge.identity import recipe_digest
    from raymerge.recipe import load_recipe

    return recipe_digest(load_recipe(out / "raymerge_recipe.yaml"), manifest["identities"])


class FlakyHub(FakeHub):
    """A Hub whose uploads fail while `failing`; it serves the manifest of the last upload."""

    failing = True
    uploaded: Path | None = None

    def upload_folder(self, folder_path, **kwargs):
        if FlakyHub.failing:
            raise ConnectionError("Connection reset by peer")
        FlakyHub.uploaded = Path(folder_path)
        return super().upload_folder(folder_path, **kwargs)

    def hf_hub_download(self, repo_id, filename, repo_type):
        from huggingface_hub.errors import RemoteEntryNotFoundError

        if FlakyHub.uploaded is None:
            raise RemoteEntryNotFoundError("404: entry not found", response=SimpleNamespace(
                headers={}, status_code=404, request=None))
        return str(FlakyHub.uploaded / filename)


def test_a_push_failing_on_the_network_is_retried_and_a_refused_one_is_not(
        ray_cluster, float32_family, tmp_path, capsys, monkeypatch):
    from raymerge.output import hub

    monkeypatch.setattr(hub, "PUSH_FIRST_WAIT_S", 0.01)

    class TwiceFlaky(FlakyHub):
        def upload_folder(self, folder_path, **kwargs):
            TwiceFlaky.attempts += 1
            FlakyHub.failing = TwiceFlaky.attempts <= 2
            return super().upload_folder(folder_path, **kwargs)

    monkeypatch.setattr(huggingface_hub, "HfApi", TwiceFlaky)
    TwiceFlaky.calls, TwiceFlaky.attempts, FlakyHub.uploaded = [], 0, None
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(float32_family["base"]), "sources": [str(float32_family["sources"][0])],
        "output": {"path": str(out), "push_to_hub": "org/merged-model"}})
    assert main(["merge", str(recipe), "--no-progress"]) == 0
    assert TwiceFlaky.attempts == 3 and FlakyHub.uploaded == out

    class Refused(FakeHub):
        def upload_folder(self, folder_path, **kwargs):
            from huggingface_hub.errors import HfHubHTTPError

            Refused.attempts += 1
            raise HfHubHTTPError("403 Forbidden: no write access", response=SimpleNamespace(
                headers={}, status_code=403, request=None))

    monkeypatch.setattr(huggingface_hub, "HfApi", Refused)
    Refused.calls, Refused.attempts = [], 0
    capsys.readouterr()
    assert main(["merge", str(recipe), "--no-progress"]) == 2
    assert Refused.attempts == 1 and "403 Forbidden" in capsys.readouterr().err


def test_a_failed_push_is_pushed_by_the_next_regenerate_without_merging_again(
        ray_cluster, float32_family, tmp_path, capsys, monkeypatch):
    from raymerge.output import hub

    monkeypatch.setattr(hub, "PUSH_FIRST_WAIT_S", 0.01)
    monkeypatch.setattr(huggingface_hub, "HfApi", FlakyHub)
    FlakyHub.calls, FlakyHub.failing, FlakyHub.uploaded = [], True, None
    out = tmp_path / "merged"
    registry = tmp_path / "registry.yaml"
    registry.write_text(json.dumps({"models": [{"name": "team", "recipe": {
        "base": str(float32_family["base"]), "sources": [str(float32_family["sources"][0])],
        "output": {"path": str(out), "push_to_hub": "org/merged-model"}}}]}))

    def regenerate() -> tuple[int, dict]:
        code = main(["regenerate", str(registry), "--json"])
        lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()
                 if line.startswith("{")]
        return code, lines[0]

    code, first = regenerate()
    assert code == 1 and first["status"] == "error" and "Connection reset" in first["error"]
    assert (out / "raymerge_manifest.json").exists()  # merged and published locally
    merged_at = (out / "raymerge_manifest.json").stat().st_mtime_ns
    FlakyHub.failing, FlakyHub.calls = False, []
    code, second = regenerate()
    assert code == 0 and second["status"] == "pushed"
    assert second["hub_commit"].endswith("/commit/abc123")
    assert (out / "raymerge_manifest.json").stat().st_mtime_ns == merged_at  # not merged again
    assert [call[0] for call in FlakyHub.calls] == ["create_repo", "upload_folder"]
    code, third = regenerate()  # the Hub's manifest now carries this merge
    assert code == 0 and third["status"] == "unchanged" and len(FlakyHub.calls) == 2
