"""Hub ids offline (HF_HUB_OFFLINE): resolved through the local Hugging Face cache, with the
revision pinned. Online, by range requests: tests/sources/test_remote_sources.py."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
from helpers import manifest, write_recipe

from raymerge.cli import main
from raymerge.errors import SourceError
from raymerge.sources import resolve_checkpoint

COMMIT = "3f2a1c9" + "0" * 33


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, float32_family):
    """A Hugging Face cache holding org/ft-math as the Hub would have downloaded it."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--ft-math"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in sorted(Path(float32_family["sources"][0]).iterdir()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, repo / "blobs" / digest)
        (snapshot / file.name).symlink_to(repo / "blobs" / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_resolves_to_the_cached_snapshot_with_its_commit(hub_cache):
    for label in ("org/ft-math", f"org/ft-math@{COMMIT}"):
        checkpoint = resolve_checkpoint(label)
        assert checkpoint.revision == COMMIT
        assert checkpoint.directory.name == COMMIT and checkpoint.tensors


def test_unknown_hub_id_offline_says_so(hub_cache):
    with pytest.raises(SourceError, match="org/absent: not in the local Hugging Face cache and "
                                          r"the Hub cannot be reached \(offline\?\); download "
                                          "it first, unset HF_HUB_OFFLINE"):
        resolve_checkpoint("org/absent")


def test_merge_with_a_hub_source_pins_revision_and_hashes(ray_cluster, hub_cache, tmp_path,
                                                          float32_family):
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(float32_family["base"]), "sources": ["org/ft-math"],
        "output": {"path": str(out)}})
    assert main(["merge", str(recipe), "--no-progress"]) == 0
    source = manifest(out)["sources"][0]
    assert source["source"] == "org/ft-math" and source["revision"] == COMMIT
    local = Path(float32_family["sources"][0]) / "model.safetensors"
    expected = hashlib.sha256(local.read_bytes()).hexdigest()
    assert source["files"]["model.safetensors"]["sha256"] == expected
    assert COMMIT in (out / "README.md").read_text()


def test_a_hub_blob_that_does_not_match_its_published_sha256_is_refused(
        ray_cluster, hub_cache, tmp_path, float32_family, capsys):
    snapshot = hub_cache / "models--org--ft-math" / "snapshots" / COMMIT
    blob = (snapshot / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor: the header still reads fine
    blob.write_bytes(bytes(data))
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "base": str(float32_family["base"]), "sources": ["org/ft-math"],
        "output": {"path": str(out)}})
    assert main(["merge", str(recipe), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert f"does not match the {blob.name} the Hub published" in error
    assert f"delete {blob} and download it again" in error and len(error.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
