"""The output's blocks when a recipe gives `slices` (mergekit's layer ranges): checked against
the checkpoints' headers before any work, one line per problem."""

from __future__ import annotations

from raymerge.errors import RecipeError
from raymerge.roles import block_of
from raymerge.sources.checkpoint import Checkpoint


def block_stacks(checkpoint: Checkpoint) -> dict[str, list[int]]:
    """Each stack of blocks ("model.layers") and the indices of its blocks, sorted."""
    stacks: dict[str, set[int]] = {}
    for name in checkpoint.tensors:
        block = block_of(name)
        if block is not None:
            stack, _, index = block.rpartition(".")
            stacks.setdefault(stack, set()).add(int(index))
    return {stack: sorted(indices) for stack, indices in stacks.items()}


def check_slices(recipe, checkpoints: dict[str, Checkpoint]) -> None:
    """Every slice source is a checkpoint of the recipe and its range lies inside its layers;
    the layout is the identity (one slice, every checkpoint's every layer), which is the
    whole-model merge. `checkpoints`: path as written in the recipe -> its checkpoint."""
    if recipe.slices is None:
        return
    for index, spec in enumerate(recipe.slices):
        for position, source in enumerate(spec.sources):
            where = f"slices.{index}.sources.{position}"
            checkpoint = checkpoints.get(source.path)
            if checkpoint is None:
                raise RecipeError(f"{where}.path: {source.path!r} is neither the base nor a "
                                  "source of the recipe; list it under sources")
            start, end = source.layer_range
            layers = _layer_count(checkpoint, where)
            if not 0 <= start < end <= layers:
                raise RecipeError(
                    f"{where}.layer_range: [{start}, {end}] is outside the {layers} layers of "
                    f"{checkpoint.label} (0 <= start < end <= {layers}); fix the range")
    spec = recipe.slices[0]
    whole = len(recipe.slices) == 1 and all(
        tuple(source.layer_range) == (0, _layer_count(checkpoints[source.path], "slices"))
        for source in spec.sources)
    if not whole:
        ranges = ", ".join(f"{s.path} {list(s.layer_range)}" for s in spec.sources)
        raise RecipeError(
            f"slices: {ranges} takes part of the layers, which changes the model's layout; "
            "raymerge merges slices that take every layer of every checkpoint: use "
            "layer_range [0, number of layers] or mergekit for layer stacking")


def _layer_count(checkpoint: Checkpoint, where: str) -> int:
    stacks = block_stacks(checkpoint)
    if len(stacks) != 1:
        found = ", ".join(stacks) or "none"
        raise RecipeError(f"{where}: {checkpoint.label} has {len(stacks)} stacks of blocks "
                          f"({found}); slices need a model with one stack of layers "
                          "(mergekit requires its modules: syntax otherwise)")
    (indices,) = stacks.values()
    return len(indices)
