"""Map a mergekit YAML (task_arithmetic, ties, dare_linear, linear) onto a raymerge recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raymerge.errors import RecipeError

_METHODS = {"task_arithmetic": "task_arithmetic", "ties": "ties", "dare_linear": "dare",
            "linear": "task_arithmetic"}
_KNOWN_TOP = {"merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source",
              "out_dtype"}


def recipe_from_mergekit(data: dict[str, Any], origin: Path) -> dict[str, Any]:
    merge_method = data["merge_method"]
    if not isinstance(merge_method, str) or merge_method not in _METHODS:
        raise RecipeError(
            f"{origin}: merge_method {merge_method!r} has no raymerge equivalent; "
            f"use one of {', '.join(_METHODS)} or write a raymerge recipe"
        )
    unknown = sorted(set(map(str, data)) - _KNOWN_TOP)
    if unknown:
        raise RecipeError(f"{origin}: mergekit key {unknown[0]!r} is not supported; remove it")
    models = data.get("models") or []
    if not isinstance(models, list) or not models:
        raise RecipeError(f"{origin}: models: give at least one model")
    top = _mapping(origin, "parameters", data.get("parameters"))
    base = data.get("base_model")
    entries = [_model_entry(origin, index, entry) for index, entry in enumerate(models)]
    if base is None:
        if merge_method != "linear":
            raise RecipeError(f"{origin}: base_model is required for {merge_method}")
        base = entries[0][0]  # a weighted average needs no base: deltas from any model cancel
    sources = [(path, params) for path, params in entries if path != base]
    if merge_method == "linear":
        total = sum(_param(origin, p, top, "weight", 1.0) for _, p in entries)
        if total == 0:
            raise RecipeError(f"{origin}: linear weights sum to 0; give positive weights")
        sources = [(path, {**p, "weight": _param(origin, p, top, "weight", 1.0) / total})
                   for path, p in sources]
    method: dict[str, Any] = {"name": _METHODS[merge_method]}
    if "lambda" in top:
        method["scale"] = top["lambda"]
    if merge_method in ("ties", "dare_linear"):
        densities = {_param(origin, p, top, "density", 1.0) for _, p in sources}
        if len(densities) > 1:
            raise RecipeError(f"{origin}: per-model density differs ({sorted(densities)}); "
                              "raymerge uses one density for all sources")
        density = densities.pop()
        if merge_method == "ties":
            method["density"] = density
        else:
            method["p"] = 1.0 - density
    recipe: dict[str, Any] = {
        "base": str(base),
        "sources": [{"path": str(path), "weight": _param(origin, p, top, "weight", 1.0)}
                    for path, p in sources],
        "method": method,
    }
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype:
        recipe["output"] = {"dtype": dtype}
    return recipe


def _model_entry(origin: Path, index: int, entry: Any) -> tuple[str, dict]:
    if not isinstance(entry, dict) or "model" not in entry:
        raise RecipeError(f"{origin}: models.{index}: expected a mapping with 'model'")
    return str(entry["model"]), _mapping(origin, f"models.{index}.parameters",
                                         entry.get("parameters"))


def _mapping(origin: Path, where: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{origin}: {where}: expected a mapping, got {value!r}")
    return value


def _param(origin: Path, params: dict, top: dict, key: str, default: float) -> float:
    value = params.get(key, top.get(key, default))
    if not isinstance(value, (int, float)):
        raise RecipeError(f"{origin}: parameter {key} must be a number (gradients of values "
                          f"across layers are not supported), got {value!r}")
    return float(value)
