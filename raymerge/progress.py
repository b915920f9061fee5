"""The driver's progress bar (bytes read per second) and the end-of-run summary."""

from __future__ import annotations

import sys

from tqdm import tqdm

from raymerge.plan import Plan
from raymerge.sizes import format_size


class MergeProgress:
    def __init__(self, plan: Plan, enabled: bool = True) -> None:
        self.plan = plan
        self.enabled = enabled
        self.units_done = 0

    def __enter__(self) -> MergeProgress:
        self.bar = tqdm(total=self.plan.read_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                        desc="merging", disable=not self.enabled, file=sys.stderr,
                        dynamic_ncols=True)
        return self

    def advance(self, stats: dict) -> None:
        self.units_done += 1
        self.bar.update(stats["read_bytes"])
        self.bar.set_postfix_str(f"units {self.units_done}/{len(self.plan.units)}")

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def format_summary(summary: dict, output: str) -> str:
    return "\n".join([
        f"merged {summary['num_sources']} sources into {output}",
        *_vocabulary_lines(summary.get("vocabulary")),
        *no_effect_lines(summary.get("no_effect")),
        *_listed("copied tensors", summary.get("copied_tensors"), "(integer, as in the base)"),
        *_listed("files copied", summary.get("copied_files"), "(from the base)"),
        f"  time                 {summary['seconds']:.1f} s "
        f"({summary['units']} units, {summary['num_tensors']} tensors)",
        f"  bytes read           {format_size(summary['read_bytes'])} "
        f"({format_size(summary['read_bytes_per_second'])}/s)",
        f"  bytes written        {format_size(summary['output_bytes'])}",
        f"  peak memory per task {format_size(summary['peak_task_bytes_measured'])} measured, "
        f"{format_size(summary['peak_task_bytes_estimated'])} estimated",
        f"  Ray cluster          {summary['cluster']}"
        f"{' (private, started for this run)' if summary['private_cluster'] else ''}",
        f"  tasks                on {summary['device']}, {summary['num_gpus']:g} GPU each, "
        f"{summary['max_in_flight']} at a time",
    ])


def format_runtime(runtime) -> str:
    """What each task asks for and how many run at once, `auto` explained (it is resolved
    against the cluster when the merge connects; the summary shows the values it took)."""
    gpus = ("auto (1 per task where the cluster has GPUs, else 0)"
            if runtime.num_gpus == "auto" else f"{runtime.num_gpus:g}")
    in_flight = ("auto (the cluster's task slots: its GPUs or CPUs by what a task asks for, "
                 "bounded by memory)" if runtime.max_in_flight == "auto"
                 else str(runtime.max_in_flight))
    return (f"tasks: num_cpus {runtime.num_cpus:g}, num_gpus {gpus}, device {runtime.device}, "
            f"max_in_flight {in_flight}")


def format_vocabulary(vocabulary: dict) -> str:
    """One line: the output vocabulary, the tokens it adds, the tokens it drops."""
    added = vocabulary["added_tokens"]
    text = (f"{vocabulary['source']}: {vocabulary['tokens']} tokens in {vocabulary['rows']} rows"
            + (f", {len(added)} added ({_few(added)})" if added else ""))
    for label, count in vocabulary["dropped_tokens"].items():
        text += f"; {count} tokens of {label} dropped"
    return text


def no_effect_lines(no_effect: dict[str, str] | None) -> list[str]:
    """The mergekit options a recipe gave that change nothing, one line each with the reason."""
    return [f"  accepted, no effect in raymerge: {where} = {why}"
            for where, why in (no_effect or {}).items()]


def _vocabulary_lines(vocabulary: dict | None) -> list[str]:
    return [f"  vocabulary           {format_vocabulary(vocabulary)}"] if vocabulary else []


def _listed(what: str, names: list[str] | None, note: str) -> list[str]:
    return [f"  {what:<20} {len(names)} {note}: {_few(names)}"] if names else []


def _few(names: list[str], shown: int = 4) -> str:
    text = ", ".join(repr(name) if " " in name or not name.isprintable() else name
                     for name in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def format_plan(plan: Plan, parameters: dict[int, str] | None = None) -> str:
    """The units with their bytes and memory; with `parameters` (unit index -> the resolved
    values of the parameters that vary), those too."""
    parameters = parameters or {}
    rows = [f"{'unit':<40} {'tensors':>7} {'read':>11} {'est. peak':>11}"
            + ("  parameters" if parameters else "")]
    for unit in plan.units:
        rows.append(f"{unit.name:<40} {len(unit.tensors):>7} {format_size(unit.read_bytes):>11} "
                    f"{format_size(unit.peak_bytes):>11}"
                    + (f"  {parameters[unit.index]}" if unit.index in parameters else ""))
    rows.append(f"{len(plan.units)} units, {len(plan.tensors)} tensors, {plan.num_sources} sources;"
                f" read {format_size(plan.read_bytes)}, write {format_size(plan.output_bytes)},"
                f" peak memory per task ≈ {format_size(plan.peak_bytes)}"
                + (f" (on a GPU, with an exact SVD's workspace ≈ "
                   f"{format_size(plan.device_peak_bytes)})"
                   if plan.device_peak_bytes > plan.peak_bytes else ""))
    return "\n".join(rows)
