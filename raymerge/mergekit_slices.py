"""mergekit's `slices:` as raymerge reads them (mergekit 0.1.5's MergePlanner semantics).

A mergekit slice lists, per model, a `layer_range` [start, end); the output's blocks are the
slices' layers in order, numbered from 0; within a slice, layer `start + i` of every source is
merged into output block `offset + i`, and a gradient runs over the slice's own layers (layer i
of n at i / (n − 1)). Parameters resolve per model in the slice, then the slice's, then the
top level's (a filter list that matches nothing falls through to the next). `base_model` of a
slice overrides the top level's. Embeddings come from the first slice's models, the final norm
and head from the last slice's.

Here a configuration of one slice whose models all take the same range becomes the models-form
configuration it equals (LazyMergekit's slerp and most published `slices:` recipes), with the
range kept in the recipe's `slices` (raymerge.layout checks it against the layers, and merges
the whole model when it is every layer). Any other layout (frankenmerges, depth up-scaling,
merged slices with their own parameters) becomes raymerge slices, each mapped as the
models-form configuration of its own models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raymerge.errors import RecipeError
from raymerge.mergekit import (
    MERGEKIT_METHODS,
    dtype_keys,
    model_reference,
    recipe_from_mergekit,
    vocabulary_keys,
)

SLICE_KEYS = {"sources", "base_model", "parameters", "residual_weight"}
SLICE_SOURCE_KEYS = {"model", "layer_range", "parameters"}
# slice keys mergekit 0.1.5 defines and never reads: accepted, reported as having no effect
SLICE_NO_EFFECT = {
    "residual_weight": "mergekit 0.1.5 defines it on a slice and reads it nowhere",
}


def sliced_recipe(data: dict[str, Any], origin: Path) -> dict[str, Any]:
    """A configuration with `slices:` (raymerge.mergekit_slices): passthrough's copied ranges,
    the models-form merge one slice equals, or one merged slice after another."""
    name = data.get("merge_method")
    if data.get("slices") is None:
        raise RecipeError(f"{origin}: passthrough copies the layer ranges listed under slices:; "
                          "give slices (raymerge does not copy a whole model)")
    notes: dict[str, str] = {}
    checked = checked_slices(data, origin, notes)
    if name == "passthrough":
        recipe = passthrough_recipe(data, origin, checked)
        recipe |= dtype_keys(origin, data) | vocabulary_keys(origin, data)
    elif is_models_form(checked):
        config, recipe_slices = models_form(data, origin, checked)
        recipe = recipe_from_mergekit(_slice_base(origin, config, name, 0), origin)
        recipe["slices"] = recipe_slices
        notes |= recipe.pop("no_effect", {})
    else:
        slices, paths = [], []
        for index in range(len(checked)):
            config, (ranges,) = models_form(data, origin, checked, index)
            try:
                mapped = recipe_from_mergekit(_slice_base(origin, config, name, index), origin)
            except RecipeError as error:  # said of the slice it is about
                where = f"{origin}: " if str(error).startswith(f"{origin}: ") else ""
                raise RecipeError(f"{origin}: slices.{index}: "
                                  f"{str(error).removeprefix(where)}") from None
            slices.append(merged_slice(mapped, ranges["sources"]))
            paths += [source["path"] for source in slices[-1]["sources"]]
            notes |= {f"slices.{index}: {key}": value
                      for key, value in mapped.pop("no_effect", {}).items()}
            recipe = recipe if index else mapped
        base = model_reference(origin, "base_model", data["base_model"], False) \
            if data.get("base_model") is not None else recipe["base"]
        recipe |= {"base": base, "slices": slices, "sources": [
            {"path": path} for path in dict.fromkeys(paths) if path != base]}
    if notes:
        recipe["no_effect"] = notes
    return recipe


def _slice_base(origin: Path, data: dict, name: Any, index: int) -> dict:
    """A slice's models are its inputs as they are: for a method with a base (every one but
    linear and karcher), base_model must be one of them (mergekit: "Base input is not present
    in merge inputs"); linear and karcher take no base, and mergekit adds none to a slice."""
    spec = MERGEKIT_METHODS.get(name) if isinstance(name, str) else None
    paths = [model_reference(origin, f"slices.{index}.sources.{position}.model",
                             entry["model"], True)
             for position, entry in enumerate(data["models"])]
    base = data.get("base_model")
    if base is None or spec is None:  # an unknown method: refused by the models-form mapping
        return data
    base = model_reference(origin, "base_model", base, allow_lora=False)
    if base in paths:
        return data
    if spec.base == "symmetric":
        return {key: value for key, value in data.items() if key != "base_model"}
    raise RecipeError(f"{origin}: slices.{index}.sources: base_model {base} is not among the "
                      f"slice's models, and {name} merges onto it (mergekit refuses this too); "
                      "add it to the slice's sources with the same layer_range")


def checked_slices(data: dict[str, Any], origin: Path, notes: dict[str, str]) -> list[tuple]:
    """Each slice's (sources with their layer ranges, base_model, parameters), checked."""
    slices = data["slices"]
    if data.get("models") is not None:
        raise RecipeError(f"{origin}: give models or slices, not both (mergekit refuses both "
                          "too)")
    if not isinstance(slices, list) or not slices:
        raise RecipeError(f"{origin}: slices: expected a list of slices, each with sources:")
    return [_slice(origin, index, entry, notes) for index, entry in enumerate(slices)]


def is_models_form(checked: list[tuple]) -> bool:
    """One slice whose models all take the same range: the models-form configuration."""
    return len(checked) == 1 and len({tuple(s["layer_range"]) for s in checked[0][0]}) == 1


def models_form(data: dict[str, Any], origin: Path, checked: list[tuple], index: int = 0
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the models-form configuration of slice `index`, the raymerge `slices` of that slice
    alone, with each model's range)."""
    sources, slice_base, slice_parameters = checked[index]
    config = {key: value for key, value in data.items() if key != "slices"}
    config["models"] = [{"model": source["model"],
                         **({"parameters": source["parameters"]} if source.get("parameters")
                            is not None else {})} for source in sources]
    if slice_base is not None:
        config["base_model"] = slice_base
    merged = _merged_parameters(origin, index, slice_parameters, data.get("parameters"))
    if merged is not None:
        config["parameters"] = merged
    recipe_slices = [{"sources": [{"path": str(source["model"]),
                                   "layer_range": list(source["layer_range"])}
                                  for source in sources]}]
    return config, recipe_slices


def passthrough_recipe(data: dict[str, Any], origin: Path, checked: list[tuple]
                       ) -> dict[str, Any]:
    """mergekit's passthrough: every slice copies one model's layer range, its tensors times
    `scale` where given (per model in the slice, else the slice's, else the top level's). The
    recipe's base (whose config.json the output takes, its layer count and per-layer lists made
    to fit) is base_model, else the first slice's model."""
    _only_scale(origin, "parameters", data.get("parameters"))
    slices, paths = [], []
    for index, (sources, _, slice_parameters) in enumerate(checked):
        if len(sources) != 1:
            raise RecipeError(f"{origin}: slices.{index}.sources: passthrough copies one model's "
                              f"layers per slice, got {len(sources)} models (mergekit refuses "
                              "this too); split them into slices or use another merge_method")
        (source,) = sources
        _only_scale(origin, f"slices.{index}.parameters", slice_parameters)
        _only_scale(origin, f"slices.{index}.sources.0.parameters", source.get("parameters"))
        scale = (_merged_parameters(origin, index, source.get("parameters"), _merged_parameters(
            origin, index, slice_parameters, data.get("parameters"))) or {}).get("scale")
        path = model_reference(origin, f"slices.{index}.sources.0.model", source["model"], False)
        slices.append({"sources": [{"path": path, "layer_range": list(source["layer_range"]),
                                    **({"parameters": {"scale": scale}} if scale is not None
                                       else {})}]})
        paths.append(path)
    base = model_reference(origin, "base_model", data["base_model"], False) \
        if data.get("base_model") is not None else paths[0]
    others = [path for path in dict.fromkeys(paths) if path != base]
    return {"base": base, "sources": [{"path": path} for path in others], "slices": slices}


def _only_scale(origin: Path, where: str, parameters: Any) -> None:
    """passthrough's one parameter is scale (mergekit's PassthroughMerge)."""
    if parameters is not None and not isinstance(parameters, dict):
        raise RecipeError(f"{origin}: {where}: expected a mapping, got {parameters!r}")
    for key in parameters or {}:
        if key != "scale":
            raise RecipeError(f"{origin}: {where}.{key}: not a parameter of mergekit's "
                              "passthrough (it takes: scale); fix or remove it")


def merged_slice(recipe: dict[str, Any], ranges: list[dict[str, Any]]) -> dict[str, Any]:
    """One merged slice of a raymerge recipe from the recipe its models-form configuration
    maps to: each model's range, weight and parameters, the slice's base and method."""
    by_path = {source["path"]: source for source in recipe["sources"]}
    sources = []
    for entry in ranges:
        source = by_path.get(entry["path"], {})
        sources.append({**entry, **{key: source[key] for key in ("weight", "parameters")
                                    if key in source}})
    method = {key: value for key, value in recipe["method"].items() if key != "name"}
    return {"sources": sources, "base": recipe["base"], "method": method}


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


def _merged_parameters(origin: Path, index: int, inner: Any, outer: Any) -> dict | None:
    """A slice's parameters over the top level's, as mergekit resolves them: the slice's value
    wins; a filter list of the slice that matches nothing falls through to the top level's."""
    if inner is None:
        return outer
    if not isinstance(inner, dict):
        raise RecipeError(f"{origin}: slices.{index}.parameters: expected a mapping, got "
                          f"{inner!r}")
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
