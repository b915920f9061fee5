"""`raymerge regenerate REGISTRY.yaml`: re-merge the registry's models whose inputs changed.

    factor_cache: /shared/raymerge/factors   # optional: each model's runtime.factor_cache default
    models:
      - name: team-merge
        recipe: recipes/team.yaml            # relative to this file, or an inline recipe mapping
        output: /models/team-merge           # optional: overrides the recipe's output.path

For each model every source is resolved to an immutable identity (Hub commit, or sha256 of the
local files); the submission id hashes the recipe with those identities. A model whose published
output carries the same submission id is skipped, as is one whose identical merge is being
written on this cluster now: a duplicate scheduled run is a no-op. An unchanged model with
`output.push_to_hub` whose Hub repository does not hold this merge (its manifest's submission id
differs or is missing: an earlier push failed) is pushed again, without merging. A failing model
(an error, a crash, a lost cluster) does not stop the others; the run fails (exit 1) if any did."""

from __future__ import annotations

import json
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from raymerge.errors import RaymergeError
from raymerge.identity import submission_id
from raymerge.output.hub import commit_message, push_to_hub, pushed_submission_id
from raymerge.recipe import StrictModel, load_recipe, read_yaml, recipe_from_dict, validate_config
from raymerge.store import join
from raymerge.store.objects import scheme_of


class ModelEntry(StrictModel):
    name: str = Field(min_length=1)
    recipe: str | dict[str, Any]
    output: str | None = None


class Registry(StrictModel):
    factor_cache: str | None = None
    models: list[ModelEntry] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelEntry]) -> list[ModelEntry]:
        names = [model.name for model in models]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicated)}")
        return models


@dataclass
class Outcome:
    """What happened to one model, as the JSON record a scheduler reads."""

    name: str
    status: str  # merged | unchanged | running | would-merge | error
    output: str | None = None
    submission_id: str | None = None
    detail: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"name": self.name, "status": self.status, "output": self.output,
                "submission_id": self.submission_id, **self.detail}


def load_registry(path: str | Path) -> tuple[Registry, str]:
    """The registry (a local file or an object-store URI) and the directory or prefix its
    recipes' relative paths start from."""
    data = read_yaml(path, "registry")
    registry = validate_config(Registry, data, f"registry {path}")
    if scheme_of(str(path)):
        return registry, str(path).rsplit("/", 1)[0]
    return registry, str(Path(path).resolve().parent)


def regenerate(registry: Registry, root: str, address: str | None = None, force: bool = False,
               dry_run: bool = False, on_outcome=None) -> list[Outcome]:
    """Every model in order; `on_outcome(outcome)` is called as each one is decided."""
    from raymerge.distributed.cluster import ray_session

    outcomes = []
    with nullcontext() if dry_run else ray_session(address):
        for entry in registry.models:
            outcome = _one_model(entry, registry, root, address, force, dry_run)
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
    return outcomes


def _one_model(entry: ModelEntry, registry: Registry, root: str, address, force: bool,
               dry_run: bool) -> Outcome:
    from raymerge.merge import identities_of, prepare, run_merge

    started = time.perf_counter()
    try:
        prepared = prepare(_recipe(entry, registry, root))
        sid = submission_id(prepared.recipe, identities_of(prepared))
        outcome = Outcome(entry.name, "merged", str(prepared.output), sid,
                          {"sources": identities_of(prepared)})
        repo = prepared.recipe.output.push_to_hub
        if not force and _published_id(prepared) == sid:
            outcome.status = "unchanged"
            if repo and pushed_submission_id(repo) != sid:  # an earlier push failed
                outcome.status = "would-push" if dry_run else "pushed"
                if not dry_run:
                    outcome.detail["hub_commit"] = push_to_hub(
                        prepared.target, repo, commit_message(prepared, {"submission_id": sid}),
                        private=prepared.recipe.output.private)
        elif dry_run:
            outcome.status = "would-merge"
        elif _running(prepared):
            outcome.status = "running"
        else:
            result = run_merge(prepared, address=address, show_progress=False)
            outcome.detail |= {key: result.summary[key] for key in (
                "seconds", "read_bytes", "output_bytes", "resumed_units", "factor_cache_hits",
                "factor_cache_misses")}
            if "hub_commit" in result.summary:
                outcome.detail["hub_commit"] = result.summary["hub_commit"]
    except RaymergeError as error:
        return Outcome(entry.name, "error", detail={"error": str(error)})
    except Exception as error:  # a crash of this model's merge: reported, the next one starts
        traceback.print_exc(file=sys.stderr)
        return Outcome(entry.name, "error", detail={
            "error": f"{entry.name}: the merge crashed ({type(error).__name__}: {error}); "
                     "its traceback is above: report it with the recipe"})
    outcome.detail["wall_seconds"] = round(time.perf_counter() - started, 3)
    return outcome


def _recipe(entry: ModelEntry, registry: Registry, root: str):
    if isinstance(entry.recipe, dict):
        recipe = recipe_from_dict(entry.recipe, origin=f"registry model {entry.name}")
    else:
        recipe = load_recipe(join(root, entry.recipe))
    updates: dict[str, Any] = {}
    if entry.output is not None:
        updates["output"] = recipe.output.model_copy(update={"path": entry.output})
    if registry.factor_cache is not None and recipe.runtime.factor_cache is None:
        updates["runtime"] = recipe.runtime.model_copy(
            update={"factor_cache": registry.factor_cache})
    return recipe.model_copy(update=updates)


def _published_id(prepared) -> str | None:
    """The submission id in the published output's manifest (in its store, for an output
    there): None when there is no complete output."""
    from raymerge.output.staging import MANIFEST_NAME

    if prepared.remote is not None:
        return prepared.remote.published_id()
    try:
        return json.loads((prepared.target / MANIFEST_NAME).read_text()).get("submission_id")
    except (OSError, ValueError, AttributeError):
        return None


def _running(prepared) -> bool:
    """Whether this very merge (same resume key) is being written on this cluster now."""
    from raymerge.distributed.writer import running_merge_key
    from raymerge.merge import layout_and_key
    from raymerge.output.staging import Staging

    place = prepared.remote.staging_uri if prepared.remote else Staging(prepared.target).path
    return running_merge_key(place) == layout_and_key(prepared)[1]
