"""What a recipe's varying parameters resolve to on each work unit, for `raymerge plan`."""

from __future__ import annotations

from raymerge.plan import Plan
from raymerge.recipe import Recipe
from raymerge.settings import settings_for_tensor, shown, varies


def resolved_parameters(recipe: Recipe, plan: Plan, slices=None) -> dict[int, str]:
    """For `raymerge plan`: per unit, the value each parameter that varies (a gradient, a filter
    list, a source's own value) takes on the unit's tensors; a range where they differ, a list
    over the sources for per-source keys. Units where nothing varies are absent. With `slices`
    (raymerge.layout), each merged slice's units with that slice's settings."""
    if slices is None:
        return _described(recipe.method, [s.parameters for s in recipe.sources],
                          [s.weight for s in recipe.sources], plan.units)
    described = {}
    for index, job in enumerate(slices):
        if not job.copied:
            described |= _described(job.method, job.parameters, job.weights,
                                    [unit for unit in plan.units if unit.job == index])
    return described


def _described(method, parameters: list[dict], weights: list, units) -> dict[int, str]:
    varying = [key for key in type(method).model_fields if varies(getattr(method, key))]
    per_source = sorted({key for own in parameters for key in own})
    weighted = any(varies(weight) for weight in weights)
    if not (varying or per_source or weighted):
        return {}
    described = {}
    for unit in units:
        values: dict[str, set] = {}
        for tensor in unit.tensors:
            settings, source_settings, resolved = settings_for_tensor(
                method, parameters, weights, tensor.name, tensor.layer_position)
            for key in varying:
                values.setdefault(key, set()).add(getattr(settings, key))
            for key in per_source:
                values.setdefault(key, set()).add(tuple(getattr(s, key) for s in source_settings))
            if weighted:
                values.setdefault("weight", set()).add(tuple(resolved))
        described[unit.index] = "; ".join(
            f"{key} {_range(sorted(found, key=str), shown)}" for key, found in values.items())
    return described


def _range(found: list, shown) -> str:
    def one(value) -> str:
        return "[" + ", ".join(shown(round(v, 6)) for v in value) + "]" \
            if isinstance(value, tuple) else shown(round(value, 6) if isinstance(value, float)
                                                   else value)

    return one(found[0]) if len(found) == 1 else " to ".join((one(found[0]), one(found[-1])))
