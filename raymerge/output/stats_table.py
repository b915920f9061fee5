"""raymerge_stats.parquet: one row per tensor with the merge's statistics (pyarrow), for
`raymerge inspect` and for users' own analysis. The columns are the statistics the merge's
method and SVC declare (raymerge.methods.statistics_of); long lists (spectra) live only here,
not in the JSON manifest."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

STATS_NAME = "raymerge_stats.parquet"
ARROW_TYPES = {"int": pa.int64(), "float": pa.float64(), "int_list": pa.list_(pa.int64()),
               "float_list": pa.list_(pa.float32())}


def write_stats_table(path: Path, tensor_stats: dict[str, dict], statistics) -> None:
    """`statistics`: the declared Statistic columns, in order."""
    schema = pa.schema([("tensor", pa.string()),
                        *[(stat.key, ARROW_TYPES[stat.kind]) for stat in statistics]])
    rows = [{"tensor": name, **{stat.key: stats.get(stat.key) for stat in statistics}}
            for name, stats in tensor_stats.items()]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def read_stats_table(path: Path) -> pa.Table:
    return pq.read_table(path)


def manifest_stats(stats: dict, statistics) -> dict:
    """A tensor's statistics for the manifest: all but those declared parquet-only."""
    parquet_only = {stat.key for stat in statistics if not stat.in_manifest}
    return {key: value for key, value in stats.items() if key not in parquet_only}
