"""Where every output tensor goes, fixed before any merging starts.

Output shapes and dtypes are known from the base's headers, so shard membership, each shard's
header and each tensor's byte offset are computed up front. The writer then writes a tensor's
bytes at its offset whenever it arrives: output is identical whatever order units finish in, and
the writer keeps no tensor in memory."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from raymerge.dtypes import ITEM_SIZES
from raymerge.plan import TensorTask

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Slot:
    shard: int
    offset: int  # absolute byte offset in the shard file
    nbytes: int


@dataclass(frozen=True)
class Shard:
    file_name: str
    header: bytes  # the 8-byte length prefix and the padded JSON header
    size: int  # whole file size


@dataclass(frozen=True)
class ShardLayout:
    shards: tuple[Shard, ...]
    slots: dict[str, Slot]

    @property
    def total_size(self) -> int:
        return sum(slot.nbytes for slot in self.slots.values())

    def fingerprint(self) -> str:
        """sha256 of every shard's name and header: equal layouts place every byte alike."""
        digest = hashlib.sha256()
        for shard in self.shards:
            digest.update(shard.file_name.encode() + shard.header)
        return digest.hexdigest()

    def index_json(self) -> str:
        weight_map = {name: self.shards[slot.shard].file_name
                      for name, slot in sorted(self.slots.items())}
        return json.dumps(
            {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}, indent=2
        ) + "\n"


def layout_shards(tensors: list[TensorTask], shard_size: int) -> ShardLayout:
    """Fill shards in checkpoint order up to shard_size bytes (a bigger tensor gets its own)."""
    groups: list[list[TensorTask]] = [[]]
    group_bytes = 0
    for tensor in tensors:
        if groups[-1] and group_bytes + tensor.output_bytes > shard_size:
            groups.append([])
            group_bytes = 0
        groups[-1].append(tensor)
        group_bytes += tensor.output_bytes

    shards, slots = [], {}
    for number, group in enumerate(groups):
        file_name = f"model-{number + 1:05d}-of-{len(groups):05d}.safetensors"
        # Widest dtypes first keeps every tensor aligned to its item size, as safetensors does.
        ordered = sorted(group, key=lambda t: -ITEM_SIZES[t.output_dtype])
        header, data_offsets = _header(ordered)
        for tensor, (start, end) in zip(ordered, data_offsets):
            slots[tensor.name] = Slot(shard=number, offset=len(header) + start, nbytes=end - start)
        shards.append(Shard(file_name=file_name, header=header,
                            size=len(header) + (data_offsets[-1][1] if data_offsets else 0)))
    return ShardLayout(shards=tuple(shards), slots=slots)


def _header(tensors: list[TensorTask]) -> tuple[bytes, list[tuple[int, int]]]:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets, position = [], 0
    for tensor in tensors:
        offsets.append((position, position + tensor.output_bytes))
        entries[tensor.name] = {
            "dtype": tensor.output_dtype,
            "shape": list(tensor.shape),
            "data_offsets": [position, position + tensor.output_bytes],
        }
        position += tensor.output_bytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # pad so tensor data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text, offsets
