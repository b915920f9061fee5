"""Build the output in a staging directory beside the target; publish it with a rename."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from raymerge.errors import OutputError
from raymerge.output.layout import ShardLayout
from raymerge.output.progress_log import PROGRESS_NAME, ProgressLog
from raymerge.sizes import format_size

MANIFEST_NAME = "raymerge_manifest.json"


def check_output_path(target: Path, input_directories: list[Path]) -> None:
    """Refuse, before any work, a target that would clobber an input or a foreign directory."""
    target = target.resolve()
    for directory in input_directories:
        directory = directory.resolve()
        if target == directory or directory in target.parents or target in directory.parents:
            raise OutputError(
                f"output {target} overlaps input directory {directory}; choose another output.path"
            )
    if target.exists():
        if not target.is_dir():
            raise OutputError(f"output {target} is a file; choose a directory path")
        if any(target.iterdir()) and not (target / MANIFEST_NAME).exists():
            raise OutputError(
                f"output {target} exists and is not a raymerge output; choose an empty or new path"
            )
    parent = target.parent
    if not parent.exists():
        raise OutputError(f"output {target}: parent directory {parent} does not exist; create it")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output {target}: cannot write in {parent}; check permissions")


def check_free_space(directory: Path, layout: ShardLayout, at_most: int | None = None) -> None:
    """Refuse to start when the shards still to be written cannot fit on the output's disk
    (`at_most`: an output bound for a store keeps only the shards being filled)."""
    present = sum(_allocated(directory / shard.file_name) for shard in layout.shards)
    needed = sum(shard.size for shard in layout.shards) - present
    if at_most is not None:
        needed = min(needed, at_most)
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise OutputError(
            f"output {directory.name.removesuffix('.raymerge-staging').lstrip('.')} needs "
            f"{format_size(needed)} more but {directory.parent} has {format_size(free)} free; "
            "free space or choose an output.path on a larger disk"
        )


def _allocated(path: Path) -> int:
    """Bytes a (sparse) file occupies on disk now."""
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


class Staging:
    """`.NAME.raymerge-staging` next to the target: same filesystem, so publishing is a rename."""

    def __init__(self, target: Path) -> None:
        self.target = target.resolve()
        self.path = self.target.with_name(f".{self.target.name}.raymerge-staging")
        self._old = self.target.with_name(f".{self.target.name}.raymerge-old")

    def create(self) -> Path:
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        return self.path

    def open(self, key: str) -> Path:
        """The staging directory: an interrupted run of the same merge (its progress log carries
        `key`) is kept to be resumed; anything else there is removed."""
        if ProgressLog(self.path, key).finished() is None:
            return self.create()
        return self.path

    def publish(self) -> None:
        """Swap the finished staging directory into place; a previous output is replaced whole."""
        (self.path / PROGRESS_NAME).unlink(missing_ok=True)
        shutil.rmtree(self._old, ignore_errors=True)
        if self.target.exists():
            self.target.rename(self._old)
        self.path.rename(self.target)
        shutil.rmtree(self._old, ignore_errors=True)

    def discard(self) -> None:
        for _ in range(3):  # a file appearing while it is removed leaves the directory: again
            shutil.rmtree(self.path, ignore_errors=True)
            if not self.path.exists():
                return
            time.sleep(0.1)
