"""The writer actor: one per merge, pinned to the driver's node so the output path need not be
shared storage. Tasks on any node reach it through the object store.

It survives its own death: Ray restarts it (max_restarts) and retries the calls in flight
(max_task_retries); a restarted writer reopens the shards and its progress log, and rewriting a
unit is harmless because every tensor has a fixed offset."""

from __future__ import annotations

import time
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymerge.errors import OutputError
from raymerge.output.factors import FACTORS_DIR, FactorWriter, unit_file_name
from raymerge.output.layout import ShardLayout
from raymerge.output.progress_log import ProgressLog
from raymerge.output.remote import RemoteOutput
from raymerge.output.shard_writer import ShardWriter, disk_errors
from raymerge.output.uploader import ShardUploader

WRITER_RESTARTS = 3


class ShardWriterActor:
    def __init__(self, directory: str, layout: ShardLayout, key: str,
                 remote: RemoteOutput | None = None) -> None:
        self.key = key
        self.directory = Path(directory)
        self.log = ProgressLog(self.directory, key)
        self.uploader = None
        if remote is not None:  # the progress is the store's; the local disk only stages
            self._start_remote(remote, layout)
            return
        self.done = self.log.finished()
        factors_dir = self.directory / FACTORS_DIR
        if self.done is None:  # a fresh merge
            self.done = {}
            self.writer = ShardWriter(self.directory, layout)
            self.factors = FactorWriter(factors_dir)
            self.log.start()
        else:  # resumed: after a driver's rerun, or a restart of this actor
            written = {name for record in self.done.values() for name in record["stats"]["tensors"]}
            factor_files = {name: unit_file_name(unit) for unit, record in self.done.items()
                            for name in record["factors"]}
            self.writer = ShardWriter(self.directory, layout, written=written)
            self.factors = FactorWriter(factors_dir, factor_files)

    def _start_remote(self, remote: RemoteOutput, layout: ShardLayout) -> None:
        """Shards already in the store's staging are not made again, and the units they complete
        are finished: a driver on a new node resumes from the store alone. This node's own log
        (a restart of this actor, a rerun here) adds the units whose shards are still here."""
        progress = remote.progress(self.key)
        self.uploader = ShardUploader(remote, self.key, layout, self.directory, progress)
        elsewhere = frozenset(number for number, shard in enumerate(layout.shards)
                              if shard.file_name in self.uploader.uploaded)
        local = self.log.finished()
        here = {unit: record for unit, record in (local or {}).items()
                if unit not in self.uploader.done}
        with disk_errors(self.directory, "creating the shards"):
            if local is not None and all((self.directory / shard.file_name).exists()
                                         for number, shard in enumerate(layout.shards)
                                         if number not in elsewhere):
                written = {name for record in here.values() for name in record["stats"]["tensors"]}
                self.writer = ShardWriter(self.directory, layout, written=written,
                                          elsewhere=elsewhere)
            else:
                here = {}
                self.directory.mkdir(parents=True, exist_ok=True)
                self.writer = ShardWriter(self.directory, layout, elsewhere=elsewhere)
                self.log.start()
            completed = [self.writer.finish(shard) for shard in self.writer.take_completed()]
        self.uploader.written(here, completed)
        self.done = {**self.uploader.done, **here}
        factor_files = {name: unit_file_name(unit) for unit, record in self.done.items()
                        for name in record["factors"]}
        self.factors = FactorWriter(self.directory / FACTORS_DIR, factor_files)

    def finished(self) -> dict[int, dict]:
        """Statistics of the units already on disk (resumed), by unit index."""
        return {unit: record["stats"] for unit, record in self.done.items()}

    def merge_key(self) -> str:
        return self.key

    def write(self, payload: dict, stats: dict) -> int:
        """A unit's payload from merge_unit: merged tensors and, maybe, spectral factors; logged
        as finished once its bytes are on disk."""
        written = self.writer.write(payload["tensors"])
        record = {"stats": stats, "factors": sorted(payload["factors"])}
        with disk_errors(self.directory, "writing"):
            if payload["factors"]:
                self.factors.write(payload["unit"], payload["factors"])
            self.log.record(payload["unit"], stats, record["factors"])
            if self.uploader is not None:  # in the store's progress once its shards are there
                completed = [self.writer.finish(shard) for shard in self.writer.take_completed()]
                self.uploader.written({payload["unit"]: record}, completed)
        self.done[payload["unit"]] = record
        return written

    def close(self) -> None:
        if self.uploader is not None:
            self.uploader.close()
        self.writer.close()
        with disk_errors(self.directory, "finishing"):
            self.factors.close()


WRITER_NAMESPACE = "raymerge"


def writer_name(directory: Path | str) -> str:
    """Named after its staging directory (or prefix, for an output in a store): a second merge
    into the same output on the same cluster is refused at once instead of writing into the
    same files."""
    return f"raymerge-writer:{directory}"


def running_merge_key(directory: Path | str, grace_s: float = 5.0) -> str | None:
    """The resume key of the merge writing into this staging directory on this cluster now, or
    None. A writer whose driver was just killed takes a moment to go: wait up to `grace_s`."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            actor = ray.get_actor(writer_name(directory), namespace=WRITER_NAMESPACE)
            return ray.get(actor.merge_key.remote(), timeout=grace_s)
        except ValueError:  # no such actor
            return None
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            if time.monotonic() > deadline:  # still there but not answering: treat as busy
                return "unknown"
            time.sleep(0.2)


def refuse_concurrent_writer(directory: Path | str) -> None:
    """OutputError if a merge on this cluster is writing into this staging directory now."""
    if running_merge_key(directory) is not None:
        raise OutputError(busy_message(directory))


def busy_message(directory: Path | str) -> str:
    target = str(directory).rsplit("/", 1)[-1].removesuffix(".raymerge-staging")[1:]
    return (f"another merge is writing {target} on this cluster; wait for it or choose another "
            "output.path")


def stop_writer(writer, wait_s: float = 10.0) -> None:
    """Kill the writer actor and wait until it is dead: `ray.kill` only asks, and a writer still
    finishing a shard could recreate files in a staging directory being discarded."""
    try:
        ray.kill(writer)
    except Exception:  # the cluster is gone, and the writer with it
        return
    try:
        # answers only if the kill was lost; no retry, which a dead writer would log
        ray.get(writer.finished.options(max_task_retries=0).remote(), timeout=wait_s)
    except Exception:  # RayActorError once it is dead (or the cluster is gone): what we wait for
        pass


def start_writer(directory: Path, layout: ShardLayout, key: str,
                 remote: RemoteOutput | None = None):
    """A writer actor on this (the driver's) node; it takes no CPU slot from the merge tasks.
    With `remote`, it stages in `directory` and uploads to the store; it is named after the
    store's staging prefix."""
    here = ray.get_runtime_context().get_node_id()
    actor_class = ray.remote(num_cpus=0, max_restarts=WRITER_RESTARTS,
                             max_task_retries=WRITER_RESTARTS)(ShardWriterActor)
    try:
        return actor_class.options(
            name=writer_name(remote.staging_uri if remote else directory),
            namespace=WRITER_NAMESPACE,  # shared by every driver, unlike a job's own namespace
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        ).remote(str(directory), layout, key, remote)
    except ValueError:
        raise OutputError(busy_message(remote.staging_uri if remote else directory)) from None
