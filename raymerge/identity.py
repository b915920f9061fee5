"""Immutable identities of a merge's inputs, and the ids derived from them.

A source's identity is its Hub commit (`hf:org/name@<commit>`, immutable on the Hub), its object
store's identities of its weight files (`store:...`: version ids or ETags with sizes; no byte is
read), or the sha256 of its local weight files (`sha256:...`, memoised by path, size and mtime).
The submission id is a hash of the recipe with every source replaced by its identity: two
submissions with the same id produce the same bytes, so the second is a no-op. The resume key
is a cheaper fingerprint (file sizes and mtimes, or the stores' identities; no hashing) that tells
whether a half-written staging directory belongs to the merge being started."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from raymerge.output.manifest import sha256_of
from raymerge.recipe import Recipe

# Recipe fields that change neither the output bytes nor where they go.
_SCHEDULING_ONLY = {"runtime": ("max_in_flight", "factor_cache", "resource_check",
                                 "source_cache", "source_cache_size")}
# Keys added after recipes were first published: left out of the digest while unset, so that
# adding them to raymerge changed no existing recipe's submission id.
_LEFT_OUT_WHEN_UNSET = ("tokenizer", "chat_template", "slices")
# Recorded for the user's information only: options that change no byte of the output.
_NEVER_DIGESTED = ("no_effect",)


def checkpoint_identity(checkpoint) -> str:
    """`hf:REPO@COMMIT` for a Hub source, else `sha256:` over its weight files' sha256s."""
    if checkpoint.revision:
        repo = checkpoint.label.removeprefix("hf://").partition("@")[0]
        return f"hf:{repo}@{checkpoint.revision}"
    if checkpoint.remote:  # the store's own identities (version id or ETag, with sizes)
        lines = [f"{uri.rsplit('/', 1)[-1]} {facts.size} {facts.identity}"
                 for uri, facts in sorted(checkpoint.facts.items())]
        return "store:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()
    lines = [f"{Path(path).name} {sha256_of(path)}" for path in sorted(checkpoint.files)]
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def recipe_digest(recipe: Recipe, identities: dict[str, str] | None = None) -> str:
    """sha256 of the recipe's content; with `identities` (label -> identity), source paths are
    replaced by what they point at, so moving a directory does not change it."""
    data = recipe.model_dump(mode="json")
    data.pop("storage", None)  # how the stores are reached, not what they hold
    for section, keys in _SCHEDULING_ONLY.items():
        for key in keys:
            data[section].pop(key, None)
    for key in _LEFT_OUT_WHEN_UNSET:
        if data.get(key) is None:
            data.pop(key, None)
    for key in _NEVER_DIGESTED:
        data.pop(key, None)
    if identities is not None:
        data["base"] = identities[recipe.base]
        for source in data["sources"]:
            source["path"] = identities[source["path"]]
        # a checkpoint named by its path as the vocabulary's or the chat template's source
        if data.get("tokenizer") and data["tokenizer"]["source"] in identities:
            data["tokenizer"]["source"] = identities[data["tokenizer"]["source"]]
        if data.get("chat_template") in identities:
            data["chat_template"] = identities[data["chat_template"]]
    return _digest(data)


def submission_id(recipe: Recipe, identities: dict[str, str]) -> str:
    """`rm-` and 16 hex digits: equal for submissions that would write the same output."""
    return "rm-" + recipe_digest(recipe, identities)[:16]


def resume_key(recipe: Recipe, checkpoints: list, layout_fingerprint: str) -> str:
    """Equal only for the same recipe, the same unchanged input files and the same layout."""
    files = []
    for checkpoint in checkpoints:
        if checkpoint.remote:
            files.extend([uri, facts.size, facts.identity]
                         for uri, facts in sorted(checkpoint.facts.items()))
            continue
        for path in sorted(checkpoint.files):
            stat = os.stat(path)
            files.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    return _digest({"recipe": recipe_digest(recipe), "files": files, "layout": layout_fingerprint})


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
