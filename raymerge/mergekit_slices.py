"""mergekit's `slices:` as raymerge reads them (mergekit 0.1.5's MergePlanner semantics).

A mergekit slice lists, per model, a `layer_range` [start, end); the output's blocks are the
slices' layers in order, numbered from 0; within a slice, layer `start + i` of every source is
merged into output block `offset + i`, and a gradient runs over the slice's own layers (layer i
of n at i / (n − 1)). Parameters resolve per model in the slice, then the slice's, then the
top level's (a filter list that matches nothing falls through to the next). `base_model` of a
slice overrides the top level's. Embeddings come from the first slice's models, the final norm
and head from the last slice's.

Here a configuration of one slice whose models all take the same range becomes the models-form
configuration it equals (LazyMergekit's slerp and most published `slices:` recipes); the range
is kept in the recipe's `slices` and checked against the models' layer count before any work
(a range that is not every layer changes the layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raymerge.errors import RecipeError

SLICE_KEYS = {"sources", "base_model", "parameters", "residual_weight"}
SLICE_SOURCE_KEYS = {"model", "layer_range", "parameters"}
# slice keys mergekit 0.1.5 defines and never reads: accepted, reported as having no effect
SLICE_NO_EFFECT = {
    "residual_weight": "mergekit 0.1.5 defines it on a slice and reads it nowhere",
}


def models_form(data: dict[str, Any], origin: Path, notes: dict[str, str]
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the models-form configuration `slices:` equals, the raymerge recipe's `slices`)."""
    slices = data["slices"]
    if data.get("models") is not None:
        raise RecipeError(f"{origin}: give models or slices, not both (mergekit refuses both "
                          "too)")
    if not isinstance(slices, list) or not slices:
        raise RecipeError(f"{origin}: slices: expected a list of slices, each with sources:")
    checked = [_slice(origin, index, entry, notes) for index, entry in enumerate(slices)]
    if len(checked) > 1:
        raise RecipeError(
            f"{origin}: slices: {len(checked)} slices stack layer ranges into a new layout "
            "(a frankenmerge); raymerge maps one slice whose models all take the same "
            "layer_range: use mergekit for layer stacking")
    (sources, slice_base, slice_parameters), = checked
    ranges = {tuple(source["layer_range"]) for source in sources}
    if len(ranges) != 1:
        raise RecipeError(
            f"{origin}: slices.0.sources: layer ranges {sorted(ranges)} pair different layers "
            "of the models; raymerge maps a slice whose models all take the same layer_range")
    config = {key: value for key, value in data.items() if key != "slices"}
    config["models"] = [{"model": source["model"],
                         **({"parameters": source["parameters"]} if source.get("parameters")
                            is not None else {})} for source in sources]
    if slice_base is not None:
        config["base_model"] = slice_base
    merged = _merged_parameters(origin, slice_parameters, data.get("parameters"))
    if merged is not None:
        config["parameters"] = merged
    (start, end), = ranges
    recipe_slices = [{"sources": [{"path": str(source["model"]), "layer_range": [start, end]}
                                  for source in sources]}]
    return config, recipe_slices


def _slice(origin: Path, index: int, entry: Any, notes: dict[str, str]):
    where = f"slices.{index}"
    if not isinstance(entry, dict):
        raise RecipeError(f"{origin}: {where}: expected a mapping with sources:")
    unknown = sorted(set(map(str, entry)) - SLICE_KEYS)
    if unknown:
        raise RecipeError(f"{origin}: {where}.{unknown[0]}: not a key of a mergekit slice "
                          f"({', '.join(sorted(SLICE_KEYS))})")
    for key, reason in SLICE_NO_EFFECT.items():
        if entry.get(key) is not None:
            notes[f"{where}.{key}"] = f"{entry[key]!r}: {reason}"
    sources = entry.get("sources")
    if not isinstance(sources, list) or not sources:
        raise RecipeError(f"{origin}: {where}.sources: give at least one model with a "
                          "layer_range")
    checked = []
    for position, source in enumerate(sources):
        at = f"{where}.sources.{position}"
        if not isinstance(source, dict) or "model" not in source:
            raise RecipeError(f"{origin}: {at}: expected a mapping with model and layer_range")
        extra = sorted(set(map(str, source)) - SLICE_SOURCE_KEYS)
        if extra:
            raise RecipeError(f"{origin}: {at}.{extra[0]}: not a key of a mergekit slice source "
                              f"({', '.join(sorted(SLICE_SOURCE_KEYS))})")
        checked.append({**source,
                        "layer_range": layer_range(origin, at, source.get("layer_range"))})
    lengths = {end - start for start, end in (s["layer_range"] for s in checked)}
    if len(lengths) > 1:
        raise RecipeError(f"{origin}: {where}.sources: layer ranges of {sorted(lengths)} layers; "
                          "every model of a slice gives the same number of layers")
    return checked, entry.get("base_model"), entry.get("parameters")


def layer_range(origin: Path | str, where: str, value: Any) -> list[int]:
    """A [start, end) pair of layer indices, end > start ≥ 0."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and 0 <= value[0] < value[1]):
        raise RecipeError(f"{origin}: {where}.layer_range: expected [start, end] with "
                          f"0 <= start < end, got {value!r}")
    return [int(value[0]), int(value[1])]


def _merged_parameters(origin: Path, inner: Any, outer: Any) -> dict | None:
    """A slice's parameters over the top level's, as mergekit resolves them: the slice's value
    wins; a filter list of the slice that matches nothing falls through to the top level's."""
    if inner is None:
        return outer
    if not isinstance(inner, dict):
        raise RecipeError(f"{origin}: slices.0.parameters: expected a mapping, got {inner!r}")
    if outer is not None and not isinstance(outer, dict):
        return outer  # refused by the models-form mapping, with its message
    merged = dict(outer or {})
    for key, value in inner.items():
        if key in merged and _is_filter_list(value):
            fallback = merged[key] if _is_filter_list(merged[key]) else [{"value": merged[key]}]
            merged[key] = [*value, *fallback]
        else:
            merged[key] = value
    return merged


def _is_filter_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
