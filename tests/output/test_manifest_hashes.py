"""Source hashes: correct, remembered by (path, size, mtime), Hub blobs checked against the
sha256 they are named by."""

from __future__ import annotations

import hashlib
import os

import pytest

from raymerge.errors import SourceError
from raymerge.output.manifest import sha256_of


def test_hash_is_correct_and_recomputed_when_the_file_changes(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"first version")
    assert sha256_of(str(path)) == hashlib.sha256(b"first version").hexdigest()
    path.write_bytes(b"second version, longer")
    assert sha256_of(str(path)) == hashlib.sha256(b"second version, longer").hexdigest()


def test_remembered_hash_is_reused_for_an_unchanged_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    first = sha256_of(str(path))
    stat = path.stat()
    with open(path, "r+b") as handle:  # same size, and the mtime restored: looks unchanged
        handle.write(b"WEIGHTS")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sha256_of(str(path)) == first


def test_hub_blob_is_checked_against_the_sha256_it_is_named_by(tmp_path):
    digest = hashlib.sha256(b"weights").hexdigest()
    blob = tmp_path / "blobs" / digest
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    link = tmp_path / "model.safetensors"
    link.symlink_to(blob)
    assert sha256_of(str(link)) == digest
    blob.write_bytes(b"weightz")
    with pytest.raises(SourceError, match=f"does not match the {digest} the Hub published"):
        sha256_of(str(link))
