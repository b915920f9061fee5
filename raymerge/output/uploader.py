"""Finished shards to the output's store while the merge runs.

In the writer actor of an output in a store: a shard goes up (one streamed multipart upload, on
a thread, so writing goes on) as soon as its last tensor is written, and is then removed from the
local disk. A unit counts as finished in the store's progress once every shard holding its
tensors, and its spectral factors, are there. Local disk: the shards being filled (units run in
shard order, so a few at a time); network: the output's bytes once, from this node."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from raymerge.output.factors import FACTORS_DIR, unit_file_name
from raymerge.output.layout import ShardLayout
from raymerge.output.remote import RemoteOutput


class ShardUploader:
    def __init__(self, remote: RemoteOutput, key: str, layout: ShardLayout, directory: Path,
                 progress: dict | None) -> None:
        self.remote, self.key, self.directory = remote, key, directory
        self.shard_of = {name: layout.shards[slot.shard].file_name
                         for name, slot in layout.slots.items()}
        self.uploaded: set[str] = set(progress["shards"]) if progress else set()
        self.done: dict[int, dict] = dict(progress["units"]) if progress else {}
        self._pending: dict[int, dict] = {}  # unit -> record, waiting for its shards
        self._work: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="raymerge-upload", daemon=True)
        self._thread.start()

    def written(self, records: dict[int, dict], completed: list[Path]) -> None:
        """Units whose tensors are in the local shards; `completed` shards are whole (closed)."""
        self.raise_error()
        self._work.put((records, completed))

    def close(self) -> None:
        """Wait for every upload; the first error, if any."""
        self._work.put(None)
        self._thread.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            if self._error is not None:
                continue  # drain: the actor reports the first error
            try:
                self._step(*item)
            except BaseException as error:  # noqa: BLE001 - handed to the actor's next call
                self._error = error

    def _step(self, records: dict[int, dict], completed: list[Path]) -> None:
        for path in completed:
            self.remote.upload(path, path.name)
            path.unlink()
            self.uploaded.add(path.name)
        self._pending.update(records)
        ready = [unit for unit, record in self._pending.items()
                 if {self.shard_of[name] for name in record["stats"]["tensors"]} <= self.uploaded]
        for unit in ready:
            if self._pending[unit]["factors"]:
                name = f"{FACTORS_DIR}/{unit_file_name(unit)}"
                self.remote.upload(self.directory / name, name)
                (self.directory / name).unlink()
            self.done[unit] = self._pending.pop(unit)
        if ready or completed:
            self.remote.save_progress(self.key, sorted(self.uploaded), self.done)
