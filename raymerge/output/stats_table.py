"""raymerge_stats.parquet: one row per tensor with the merge's statistics (pyarrow), for
`raymerge inspect` and for users' own analysis. Spectra (lists of σ) live only here, not in the
JSON manifest."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

STATS_NAME = "raymerge_stats.parquet"
SPECTRUM_KEYS = ("spectrum_before", "spectrum_after")  # too long for the manifest
GAMMA_COLUMNS = ("svc_gamma_min", "svc_gamma_q25", "svc_gamma_median", "svc_gamma_q75",
                 "svc_gamma_max")

SCHEMA = pa.schema([
    ("tensor", pa.string()),
    ("delta_rms", pa.float64()),
    ("delta_max_abs", pa.float64()),
    ("axis_rank", pa.int64()),
    ("axis_energy_kept", pa.float64()),
    ("axis_selected_per_source", pa.list_(pa.int64())),
    *[(name, pa.float64()) for name in GAMMA_COLUMNS],
    ("spectrum_before", pa.list_(pa.float32())),
    ("spectrum_after", pa.list_(pa.float32())),
])


def write_stats_table(path: Path, tensor_stats: dict[str, dict]) -> None:
    rows = []
    for name, stats in tensor_stats.items():
        gamma = stats.get("svc_gamma_quantiles") or [None] * len(GAMMA_COLUMNS)
        rows.append({
            "tensor": name,
            "delta_rms": stats.get("delta_rms"),
            "delta_max_abs": stats.get("delta_max_abs"),
            "axis_rank": stats.get("axis_rank"),
            "axis_energy_kept": stats.get("axis_energy_kept"),
            "axis_selected_per_source": stats.get("axis_selected_per_source"),
            **dict(zip(GAMMA_COLUMNS, gamma)),
            "spectrum_before": stats.get("spectrum_before"),
            "spectrum_after": stats.get("spectrum_after"),
        })
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


def read_stats_table(path: Path) -> pa.Table:
    return pq.read_table(path)


def manifest_stats(stats: dict) -> dict:
    return {key: value for key, value in stats.items() if key not in SPECTRUM_KEYS}
