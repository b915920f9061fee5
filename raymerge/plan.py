"""Work units: one transformer block each, loose tensors packed to a block's size. Data only."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from raymerge.dtypes import ITEM_SIZES, is_integer_code
from raymerge.roles import block_of, layer_positions, natural_key

if TYPE_CHECKING:  # the writer actor imports this module; it needs no torch
    from raymerge.sources.checkpoint import Checkpoint
    from raymerge.vocabulary import Reindexing

_NO_BLOCK_TARGET = 256 * 2**20


@dataclass(frozen=True)
class TensorTask:
    """One tensor to merge: where the base keeps it and what the output holds."""

    name: str
    shape: tuple[int, ...]  # the output's (a vocabulary-indexed tensor's rows may change)
    base_dtype: str
    output_dtype: str
    layer_position: float = 0.0  # t ∈ [0, 1], where parameter gradients are evaluated

    @property
    def copied(self) -> bool:
        """An integer or boolean tensor: copied from the base (sources must agree), not merged."""
        return is_integer_code(self.base_dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def output_bytes(self) -> int:
        return self.numel * ITEM_SIZES[self.output_dtype]


@dataclass(frozen=True)
class WorkUnit:
    index: int  # position in checkpoint order
    name: str
    tensors: tuple[TensorTask, ...]
    read_bytes: int  # base plus every source, all passes
    output_bytes: int
    peak_bytes: int  # estimated peak memory of the task that merges it
    peak_tensor: str = ""  # the tensor whose merge sets that peak
    # on a GPU: that working set, plus an exact SVD's workspace where the method takes SVDs
    device_peak_bytes: int = 0
    job: int = 0  # which merge (a slice of the layout) the unit belongs to


@dataclass(frozen=True)
class Plan:
    units: tuple[WorkUnit, ...]
    num_sources: int

    @property
    def read_bytes(self) -> int:
        return sum(unit.read_bytes for unit in self.units)

    @property
    def output_bytes(self) -> int:
        return sum(unit.output_bytes for unit in self.units)

    @property
    def peak_bytes(self) -> int:
        return max(unit.peak_bytes for unit in self.units)

    @property
    def device_peak_bytes(self) -> int:
        return max(unit.device_peak_bytes for unit in self.units)

    @property
    def tensors(self) -> list[TensorTask]:
        return [tensor for unit in self.units for tensor in unit.tensors]

    def largest_first(self) -> list[WorkUnit]:
        """Submission order: biggest units first, so the last task to finish is a small one."""
        return sorted(self.units, key=lambda unit: (-unit.read_bytes, unit.index))


def make_plan(
    base: Checkpoint,
    sources: list[Checkpoint],
    output_dtype: str | None,
    compute_itemsize: int = 4,
    passes: int = 1,
    state_tensors: int = 1,
    reindexing: Reindexing | None = None,
    svds: bool = False,
) -> Plan:
    """Group the base's tensors into work units and estimate what each costs. With
    `reindexing`, vocabulary-indexed tensors have the output vocabulary's rows. Integer and
    boolean tensors keep the base's dtype."""
    names = sorted(base.tensors, key=natural_key)
    groups: dict[str, list[str]] = {}
    loose: list[str] = []
    for name in names:
        block = block_of(name)
        if block is None:
            loose.append(name)
        else:
            groups.setdefault(block, []).append(name)
    block_bytes = [sum(base.tensors[n].nbytes for n in group) for group in groups.values()]
    target = max(block_bytes, default=_NO_BLOCK_TARGET)
    grouped = list(groups.items()) + _pack_loose(base, loose, target)
    grouped.sort(key=lambda item: natural_key(item[1][0]))

    positions = layer_positions(names)
    units = []
    for index, (unit_name, tensor_names) in enumerate(grouped):
        tensors = tuple(
            TensorTask(
                name=name,
                shape=(reindexing.shape(name, base.tensors[name].shape) if reindexing
                       else base.tensors[name].shape),
                base_dtype=base.tensors[name].dtype,
                output_dtype=(base.tensors[name].dtype if is_integer_code(base.tensors[name].dtype)
                              else output_dtype or base.tensors[name].dtype),
                layer_position=positions[name],
            )
            for name in tensor_names
        )
        units.append(_unit(index, unit_name, tensors, base, sources, compute_itemsize, passes,
                           state_tensors, svds))
    return Plan(units=tuple(units), num_sources=len(sources))


def combine_plans(plans: list[Plan], num_sources: int) -> Plan:
    """The plans of a layout's slices as one: units in checkpoint order of their first tensor,
    numbered again, each with the index of its slice; `num_sources`: the recipe's."""
    units = [replace(unit, job=job) for job, plan in enumerate(plans) for unit in plan.units]
    units.sort(key=lambda unit: natural_key(unit.tensors[0].name))
    return Plan(units=tuple(replace(unit, index=index) for index, unit in enumerate(units)),
                num_sources=num_sources)


def _pack_loose(base: Checkpoint, names: list[str], target: int) -> list[tuple[str, list[str]]]:
    """Tensors outside blocks (embeddings, final norm, head) in units of at most `target` bytes;
    a bigger tensor gets a unit of its own."""
    packed: list[tuple[str, list[str]]] = []
    current: list[str] = []
    current_bytes = 0
    for name in names:
        size = base.tensors[name].nbytes
        if current and current_bytes + size > target:
            packed.append((current[0], current))
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    if current:
        packed.append((current[0] if len(current) == 1 else f"{current[0]}+{len(current) - 1}",
                       current))
    return packed


def svd_workspace_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """An exact thin SVD of an m×n matrix (r = min(m, n)) holds, beside its input: the input's
    copy (LAPACK and cuSOLVER overwrite it), U (m×r), Vᵀ (r×n) and a workspace of about 4r²
    (divide and conquer's); an expert stack [E, m, n] is taken a matrix at a time."""
    if len(shape) < 2:
        return 0
    m, n = shape[-2], shape[-1]
    r = min(m, n)
    return (m * n + m * r + r * n + 4 * r * r) * itemsize


def _unit(index, name, tensors, base, sources, compute_itemsize, passes, state_tensors,
          svds: bool = False) -> WorkUnit:
    source_bytes = sum(source.nbytes_of(tensor.name) for source in sources for tensor in tensors)
    base_bytes = sum(base.tensors[tensor.name].nbytes for tensor in tensors)
    output_bytes = sum(tensor.output_bytes for tensor in tensors)
    # While one tensor is merged the task holds: the base and the current source delta in the
    # compute dtype, the method's state, the raw source tensor, and the unit's finished outputs.
    # A copied (integer) tensor: the base's and one source's, compared.
    working, peak_tensor = max(
        (2 * tensor.output_bytes if tensor.copied else
         tensor.numel * compute_itemsize * (2 + state_tensors)
         + max((source.nbytes_of(tensor.name) for source in sources), default=0), tensor.name)
        for tensor in tensors
    )
    workspace = max((svd_workspace_bytes(tensor.shape, compute_itemsize)
                     for tensor in tensors if not tensor.copied), default=0) if svds else 0
    return WorkUnit(
        index=index,
        name=name,
        tensors=tensors,
        read_bytes=base_bytes + passes * source_bytes,
        output_bytes=output_bytes,
        peak_bytes=working + output_bytes,
        peak_tensor=peak_tensor,
        device_peak_bytes=working + output_bytes + workspace,
    )


def check_fits(unit: WorkUnit, memory: int | None) -> None:
    """RecipeError, naming the tensor and the bytes, when a unit's estimated peak exceeds the
    `memory` a task asks Ray for: refused up front instead of killed by the OOM monitor."""
    if memory is None or unit.peak_bytes <= memory:
        return
    from raymerge.errors import RecipeError
    from raymerge.sizes import format_size

    raise RecipeError(
        f"unit {unit.name} needs about {format_size(unit.peak_bytes)} per task (merging tensor "
        f"{unit.peak_tensor} with the unit's outputs), more than runtime.memory = "
        f"{format_size(memory)}; raise runtime.memory to at least "
        f"{format_size(unit.peak_bytes)} on nodes that have it"
    )
