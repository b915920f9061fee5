"""The writer actor: one per merge, pinned to the driver's node so the output path need not be
shared storage. Tasks on any node reach it through the object store."""

from __future__ import annotations

from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymerge.errors import OutputError
from raymerge.output.factors import FACTORS_DIR, FactorWriter
from raymerge.output.layout import ShardLayout
from raymerge.output.shard_writer import ShardWriter


class ShardWriterActor:
    def __init__(self, directory: str, layout: ShardLayout) -> None:
        self.writer = ShardWriter(Path(directory), layout)
        self.factors = FactorWriter(Path(directory) / FACTORS_DIR)

    def write(self, payload: dict) -> int:
        """A unit's payload from merge_unit: merged tensors and, maybe, spectral factors."""
        written = self.writer.write(payload["tensors"])
        if payload["factors"]:
            self.factors.write(payload["unit"], payload["factors"])
        return written

    def close(self) -> None:
        self.writer.close()
        self.factors.close()


WRITER_NAMESPACE = "raymerge"


def writer_name(directory: Path) -> str:
    """Named after its staging directory: a second merge into the same output on the same
    cluster fails at once instead of writing into the same files."""
    return f"raymerge-writer:{directory}"


def refuse_concurrent_writer(directory: Path) -> None:
    """OutputError if a merge on this cluster is writing into this staging directory now."""
    try:
        ray.get_actor(writer_name(directory), namespace=WRITER_NAMESPACE)
    except ValueError:
        return
    raise OutputError(_busy(directory))


def _busy(directory: Path) -> str:
    target = directory.name.removesuffix(".raymerge-staging")[1:]
    return (f"another merge is writing {target} on this cluster; wait for it or choose another "
            "output.path")


def start_writer(directory: Path, layout: ShardLayout):
    """A writer actor on this (the driver's) node; it takes no CPU slot from the merge tasks."""
    here = ray.get_runtime_context().get_node_id()
    actor_class = ray.remote(num_cpus=0)(ShardWriterActor)
    try:
        return actor_class.options(
            name=writer_name(directory),
            namespace=WRITER_NAMESPACE,  # shared by every driver, unlike a job's own namespace
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        ).remote(str(directory), layout)
    except ValueError:
        raise OutputError(_busy(directory)) from None
