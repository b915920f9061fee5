"""The writer's progress log: one JSON line per unit whose bytes are on disk, so an interrupted
merge (driver killed, writer restarted) resumes by skipping finished units.

The first line holds the resume key of the merge that owns the staging directory; a log with
another key (another recipe, changed inputs) is not resumed. A line is appended only after the
unit's bytes are flushed, and a torn last line (a crash mid-append) is ignored."""

from __future__ import annotations

import json
import os
from pathlib import Path

PROGRESS_NAME = "raymerge_progress.jsonl"
_FORMAT = "raymerge-progress/1"


class ProgressLog:
    def __init__(self, directory: Path, key: str) -> None:
        self.path = Path(directory) / PROGRESS_NAME
        self.key = key

    def finished(self) -> dict[int, dict] | None:
        """unit index -> its record ({"stats", "factors"}); None when there is no log of this
        merge to resume."""
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return None
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn append: everything after it is unwritten
        if not records or records[0] != {"format": _FORMAT, "key": self.key}:
            return None
        return {record["unit"]: record for record in records[1:]}

    def start(self) -> None:
        self.path.write_text(json.dumps({"format": _FORMAT, "key": self.key}) + "\n")

    def record(self, unit: int, stats: dict, factors: list[str]) -> None:
        line = json.dumps({"unit": unit, "stats": stats, "factors": factors}) + "\n"
        with open(self.path, "a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
