"""`raymerge inspect DIR`: what a checkpoint holds, and for a raymerge output the statistics of
its merge (AXIS selection, SVC γ), optionally a plot of spectra before and after calibration.
DIR may be in a store (s3://, gs://, a Hub id): its headers and small files are read, no
weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

from raymerge.errors import OutputError, RaymergeError
from raymerge.output.staging import MANIFEST_NAME
from raymerge.output.stats_table import STATS_NAME, read_stats_table
from raymerge.sizes import format_size
from raymerge.sources import resolve_checkpoint
from raymerge.sources.checkpoint import Checkpoint
from raymerge.store import is_remote


def open_for_inspection(location: str) -> tuple[Checkpoint, Path]:
    """The checkpoint, and a local directory with its small files (the manifest, the stats)."""
    if is_remote(location):
        checkpoint = resolve_checkpoint(location)
        return checkpoint, checkpoint.directory
    return Checkpoint.open(location, Path(location)), Path(location)


def inspect_checkpoint(location: str, pattern: str | None = None) -> str:
    checkpoint, directory = open_for_inspection(location)
    names = [n for n in checkpoint.tensors if pattern is None or re.search(pattern, n)]
    lines = [f"{location}: {len(checkpoint.tensors)} tensors, "
             f"{format_size(checkpoint.nbytes)} in {len(checkpoint.files)} file(s)"]
    if (directory / MANIFEST_NAME).exists():
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
        method = manifest["method"]
        lines.append(f"merged by raymerge {manifest['versions']['raymerge']}: {method['name']} of "
                     f"{len(manifest['sources'])} sources, scale {method['scale']}")
    if (directory / STATS_NAME).exists() and (directory / MANIFEST_NAME).exists():
        lines += _stats_rows(directory, names, manifest["method"]["name"])
    else:
        lines.append(f"{'tensor':<50} {'dtype':>6} shape")
        lines += [f"{n:<50} {checkpoint.tensors[n].dtype:>6} {list(checkpoint.tensors[n].shape)}"
                  for n in names]
    return "\n".join(lines)


def _stats_rows(directory: Path, names: list[str], method: str) -> list[str]:
    """One row per tensor with the statistics the method (and SVC, when it ran) declares for
    `inspect`."""
    from raymerge.methods import statistics_of

    table = read_stats_table(directory / STATS_NAME)
    calibrated = "svc_gamma_min" in table.column_names
    shown = [stat for stat in statistics_of(method, calibrated)
             if stat.header and stat.key in table.column_names]
    widths = [max(9, len(stat.header)) for stat in shown]
    rows = [f"{'tensor':<46} " + " ".join(f"{stat.header:>{width}}"
                                          for stat, width in zip(shown, widths))]
    wanted = set(names)
    for row in table.to_pylist():
        if row["tensor"] in wanted:
            cells = [_cell(row[stat.key], stat.spec) for stat in shown]
            rows.append(f"{row['tensor']:<46} " + " ".join(f"{cell:>{width}}"
                                                         for cell, width in zip(cells, widths)))
    return rows


def _cell(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return str(value)
    return format(value, spec)


def plot_spectra(directory: Path, output: Path, pattern: str | None = None,
                 limit: int = 4) -> list[str]:
    """Singular values of the merged delta before and after SVC for up to `limit` tensors."""
    stats = directory / STATS_NAME
    if not stats.exists():
        raise OutputError(f"{directory} has no {STATS_NAME}; is it a raymerge output?")
    rows = [row for row in read_stats_table(stats).to_pylist()
            if row["spectrum_before"] and (pattern is None or re.search(pattern, row["tensor"]))]
    if not rows:
        raise OutputError(
            f"{directory}: no calibration spectra{' for ' + pattern if pattern else ''}; "
            "they are recorded by merges with calibrate.svc"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RaymergeError("--plot needs matplotlib: pip install 'raymerge[plot]'") from None
    rows = rows[:limit]
    figure, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.4), squeeze=False)
    for axis, row in zip(axes[0], rows):
        before = sorted(row["spectrum_before"], reverse=True)
        after = sorted(row["spectrum_after"], reverse=True)
        axis.semilogy(before, label="merged (before SVC)")
        axis.semilogy(after, label="calibrated (after SVC)")
        axis.set_title(row["tensor"].replace("model.", ""), fontsize=8)
        axis.set_xlabel("component")
        axis.set_ylabel("singular value")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return [row["tensor"] for row in rows]
