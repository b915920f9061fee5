"""The output's blocks when a recipe gives `slices` (mergekit's layer ranges), checked against
the checkpoints' headers before any work, one line per problem.

Each slice becomes views of its checkpoints: a `Checkpoint` whose tensor table maps the output's
names (blocks numbered from 0 across the slices) to the input tensors (the same file and
offset), so that a slice is planned, merged, streamed and written as any merge is. Tensors
outside the blocks come with the first slice (embeddings) or the last (final norm, head), as in
mergekit. One slice whose checkpoints all take every layer is the whole-model merge."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from raymerge.errors import RecipeError
from raymerge.roles import block_of, is_after_blocks
from raymerge.sources.checkpoint import Checkpoint


@dataclass(frozen=True)
class SliceJob:
    """One slice as a merge: views of its checkpoints under the output's tensor names."""

    base: Checkpoint
    sources: list[Checkpoint]
    weights: list[Any]
    parameters: list[dict[str, Any]]
    method: Any  # the recipe's method settings with this slice's keys over them
    copied: bool  # one checkpoint: its tensors are copied
    layers: list[int]  # per output block of this slice, the block of the slice base it is
    scale: Any = None  # a copied slice's tensors times this (mergekit passthrough's scale)


def block_stacks(checkpoint: Checkpoint) -> dict[str, list[int]]:
    """Each stack of blocks ("model.layers") and the indices of its blocks, sorted."""
    stacks: dict[str, set[int]] = {}
    for name in checkpoint.tensors:
        block = block_of(name)
        if block is not None:
            stack, _, index = block.rpartition(".")
            stacks.setdefault(stack, set()).add(int(index))
    return {stack: sorted(indices) for stack, indices in stacks.items()}


def slice_jobs(recipe, checkpoints: dict[str, Checkpoint]) -> list[SliceJob] | None:
    """The recipe's slices as merges, or None for the whole-model merge (no slices, or one
    slice that takes every layer of the base and of every source). `checkpoints`: path as
    written in the recipe -> its checkpoint."""
    if recipe.slices is None:
        return None
    layers = {}
    for index, spec in enumerate(recipe.slices):
        for position, source in enumerate(spec.sources):
            where = f"slices.{index}.sources.{position}"
            checkpoint = checkpoints.get(source.path)
            if checkpoint is None:
                raise RecipeError(f"{where}.path: {source.path!r} is neither the base nor a "
                                  "source of the recipe; list it under sources")
            layers[source.path] = count = _layer_count(checkpoint, where)
            start, end = source.layer_range
            if not 0 <= start < end <= count:
                raise RecipeError(
                    f"{where}.layer_range: [{start}, {end}] is outside the {count} layers of "
                    f"{checkpoint.label} (0 <= start < end <= {count}); fix the range")
        lengths = {end - start for start, end in (s.layer_range for s in spec.sources)}
        if len(lengths) > 1:
            raise RecipeError(f"slices.{index}.sources: layer ranges of {sorted(lengths)} "
                              "layers; every checkpoint of a slice gives the same number")
    if _is_whole_model(recipe, layers):
        return None
    if recipe.tokenizer is not None:
        raise RecipeError("tokenizer: a vocabulary other than the base's is not supported with "
                          "slices that change the layout; remove tokenizer (or merge the "
                          "vocabularies first)")
    jobs, offset = [], 0
    for index, spec in enumerate(recipe.slices):
        jobs.append(_slice_job(recipe, checkpoints, index, spec, offset))
        offset += len(jobs[-1].layers)
    return jobs


def _is_whole_model(recipe, layers: dict[str, int]) -> bool:
    if len(recipe.slices) != 1:
        return False
    (spec,) = recipe.slices
    paths = {source.path for source in spec.sources}
    return (all(tuple(s.layer_range) == (0, layers[s.path]) for s in spec.sources)
            and paths == {recipe.base, *(s.path for s in recipe.sources)}
            and len(paths) == len(spec.sources) and spec.base in (None, recipe.base)
            and not spec.method
            and all(s.weight is None and not s.parameters for s in spec.sources))


def _slice_job(recipe, checkpoints, index: int, spec, offset: int) -> SliceJob:
    where = f"slices.{index}"
    last = index == len(recipe.slices) - 1
    paths = [source.path for source in spec.sources]
    if len(set(paths)) != len(paths):
        raise RecipeError(f"{where}.sources: a checkpoint is listed twice in one slice; list it "
                          "once (or in two slices)")
    if len(spec.sources) == 1:
        (only,) = spec.sources
        if spec.method or only.weight is not None or set(only.parameters) - {"scale"}:
            raise RecipeError(f"{where}: a slice of one checkpoint is copied (times its "
                              "parameters' scale, if given): a method, weight or other "
                              "parameter would have no effect; remove them")
        view = _view(checkpoints[only.path], only.layer_range, offset, index == 0, last)
        return SliceJob(base=view, sources=[], weights=[], parameters=[], method=recipe.method,
                        copied=True, layers=list(range(*only.layer_range)),
                        scale=_scale(where, only.parameters.get("scale")))
    base_path = spec.base or recipe.base
    if base_path not in paths:
        raise RecipeError(f"{where}.base: {base_path} is not among the slice's checkpoints; "
                          f"the slice merges onto its base: list it under {where}.sources")
    recipe_sources = {source.path: source for source in recipe.sources}
    base_spec = spec.sources[paths.index(base_path)]
    base = _view(checkpoints[base_path], base_spec.layer_range, offset, index == 0, last)
    sources, weights, parameters = [], [], []
    for position, source in enumerate(spec.sources):
        if source.path == base_path:
            continue
        view = _view(checkpoints[source.path], source.layer_range, offset, index == 0, last)
        _check_shapes(base, view, f"{where}.sources.{position}")
        sources.append(view)
        own = recipe_sources.get(source.path)
        weights.append(source.weight if source.weight is not None
                       else own.weight if own is not None else 1.0)
        parameters.append({**(own.parameters if own is not None else {}), **source.parameters})
    method = _slice_method(recipe, where, spec.method, parameters)
    return SliceJob(base=base, sources=sources, weights=weights, parameters=parameters,
                    method=method, copied=False, layers=list(range(*base_spec.layer_range)))


def _view(checkpoint: Checkpoint, layer_range, offset: int, first: bool, last: bool
          ) -> Checkpoint:
    """`checkpoint` under the output's names: its blocks start..end−1 as blocks offset...,
    with the tensors outside blocks that come before them (first slice) or after (last)."""
    start, end = layer_range
    tensors = {}
    for name, info in checkpoint.tensors.items():
        block = block_of(name)
        if block is None:
            if (last if is_after_blocks(name) else first):
                tensors[name] = info
            continue
        stack, _, number = block.rpartition(".")
        if start <= int(number) < end:
            renamed = f"{stack}.{int(number) - start + offset}{name[len(block):]}"
            tensors[renamed] = info
    return replace(checkpoint, tensors=tensors)


def _scale(where: str, value: Any) -> Any:
    """A copied slice's scale: a number, a gradient or filter entries (None: not scaled)."""
    if value is None:
        return None
    from pydantic import TypeAdapter, ValidationError

    from raymerge.settings import Varying

    try:
        return TypeAdapter(Varying[float]).validate_python(value)
    except ValidationError as error:
        raise RecipeError(f"{where}.sources.0.parameters.scale: "
                          f"{error.errors()[0]['msg']}") from None


def _slice_method(recipe, where: str, keys: dict, parameters: list[dict]):
    """The recipe's method settings with the slice's keys over them; each source's parameters
    checked as the recipe's are (keys the method takes per source, in range)."""
    from raymerge.recipe import method_settings

    try:
        method = method_settings({**recipe.method.model_dump(), **keys})
    except ValueError as error:
        raise RecipeError(f"{where}.method: {error}") from None
    settings_class = type(method)
    for own in parameters:
        foreign = sorted(set(own) - settings_class.per_source)
        if foreign:
            raise RecipeError(f"{where}.sources: {foreign[0]!r} cannot be set per source for "
                              f"method {method.name} (per source: "
                              f"{', '.join(sorted(settings_class.per_source)) or 'none'})")
    return method


def _check_shapes(base: Checkpoint, view: Checkpoint, where: str) -> None:
    for name, info in base.tensors.items():
        other = view.tensors.get(name)
        if other is None or tuple(other.shape) != tuple(info.shape):
            found = "no such tensor" if other is None else f"shape {list(other.shape)}"
            raise RecipeError(
                f"{where}: {view.label} has {found} where the slice's base has {info.name} of "
                f"shape {list(info.shape)} (output tensor {name}); merge layers that match")


def _layer_count(checkpoint: Checkpoint, where: str) -> int:
    stacks = block_stacks(checkpoint)
    if len(stacks) != 1:
        found = ", ".join(stacks) or "none"
        raise RecipeError(f"{where}: {checkpoint.label} has {len(stacks)} stacks of blocks "
                          f"({found}); slices need a model with one stack of layers "
                          "(mergekit requires its modules: syntax otherwise)")
    (indices,) = stacks.values()
    return len(indices)


def relayered_config(config: dict, layer_count: int, layers: list[int]) -> dict:
    """config.json for the new layout: the layer count (every key that held the base's count,
    nested configs included) set to len(layers), and every per-layer list (layer_types, ...:
    a list of the base's layer count) taken at the base block each output block is."""
    result = {}
    for key, value in config.items():
        if isinstance(value, dict):
            result[key] = relayered_config(value, layer_count, layers)
        elif isinstance(value, list) and len(value) == layer_count:
            result[key] = [value[layer] for layer in layers]
        elif key in LAYER_COUNT_KEYS and value == layer_count:
            result[key] = len(layers)
        else:
            result[key] = value
    return result


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
