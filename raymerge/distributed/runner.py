"""Run every unit as a Ray task, at most `max_in_flight` at a time, and hand results to the
writer without pulling tensors through the driver."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import ray
from ray.exceptions import RayTaskError

from raymerge.errors import RaymergeError
from raymerge.execute import MergeJob, merge_unit
from raymerge.plan import WorkUnit
from raymerge.recipe import RuntimeSpec


def merge_unit_on_node(job: MergeJob, unit: WorkUnit):
    """merge_unit, with the id of the node that ran it added to its statistics."""
    stats, outputs = merge_unit(job, unit)
    stats["node"] = ray.get_runtime_context().get_node_id()
    return stats, outputs


def run_units(
    job: MergeJob | list[MergeJob],
    units: list[WorkUnit],
    writer,
    runtime: RuntimeSpec,
    on_unit_done: Callable[[dict], None],
) -> None:
    """Submit units in the given order; call `on_unit_done(stats)` as each one is written.
    With a list of jobs (the slices of a layout), each unit runs with `job[unit.job]`."""
    merge_unit_remote = ray.remote(merge_unit_on_node).options(
        num_returns=2,
        num_cpus=runtime.num_cpus,
        num_gpus=runtime.num_gpus,
        memory=runtime.memory,
    )
    job_refs = [ray.put(each) for each in (job if isinstance(job, list) else [job])]
    queue = deque(units)
    merging: dict[ray.ObjectRef, ray.ObjectRef] = {}  # stats ref -> tensors ref
    writing: dict[ray.ObjectRef, dict] = {}  # writer call -> stats
    try:
        while queue or merging or writing:
            while queue and len(merging) + len(writing) < runtime.max_in_flight:
                unit = queue.popleft()
                stats_ref, tensors_ref = merge_unit_remote.remote(job_refs[unit.job], unit)
                merging[stats_ref] = tensors_ref
            [ready], _ = ray.wait([*merging, *writing], num_returns=1)
            if ready in merging:
                tensors_ref = merging.pop(ready)
                stats = ray.get(ready)
                writing[writer.write.remote(tensors_ref, stats)] = stats
            else:
                ray.get(ready)
                on_unit_done(writing.pop(ready))
    except RayTaskError as error:
        _cancel(merging)
        if isinstance(error.cause, RaymergeError):
            raise error.cause from None
        raise


def _cancel(refs) -> None:
    for ref in refs:
        ray.cancel(ref, force=False)


def writer_call(ref: ray.ObjectRef):
    """The result of a call to the writer actor; its own error (a full disk, a store that went
    away) raised as itself, as a task's is."""
    try:
        return ray.get(ref)
    except RayTaskError as error:
        if isinstance(error.cause, RaymergeError):
            raise error.cause from None
        raise
