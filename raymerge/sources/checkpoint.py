"""A checkpoint on local disk: its tensor table (from headers only) and its config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from raymerge.errors import SourceError
from raymerge.sources.safetensors_header import TensorInfo, read_header
from raymerge.store.base import FileFacts
from raymerge.store.settings import StorageSettings

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

__all__ = ["Checkpoint", "TensorInfo", "read_tensor"]


@dataclass
class Checkpoint:
    """Where a model lives and what it holds. Cheap: reads headers and config.json only."""

    label: str  # the source as the user wrote it
    directory: Path
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] = field(default_factory=dict)
    revision: str | None = None
    # a checkpoint in a store: its weight files' sizes and identities (by URI), and the
    # settings a task needs to read them on its own node; `directory` then holds only the
    # small files (config, tokenizer), fetched by the driver
    facts: dict[str, FileFacts] = field(default_factory=dict)
    storage: StorageSettings | None = None

    @property
    def remote(self) -> bool:
        return bool(self.facts)

    @property
    def files(self) -> list[str]:
        return sorted({info.file for info in self.tensors.values()})

    def nbytes_of(self, name: str) -> int:
        return self.tensors[name].nbytes

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    @classmethod
    def open(cls, label: str, directory: Path, revision: str | None = None) -> Checkpoint:
        directory = Path(directory).resolve()
        return cls(
            label=label,
            directory=directory,
            tensors=_tensor_table(label, directory),
            config=_read_config(label, directory),
            revision=revision,
        )


def safetensors_files(label: str, directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory: from the index, or the single file."""
    index_path = directory / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise SourceError(
                f"source {label}: {index_path} is not a valid safetensors index; re-save it"
            ) from None
        missing = [name for name in names if not (directory / name).exists()]
        if missing:
            raise SourceError(
                f"source {label}: shard {missing[0]} listed in {INDEX_FILE} is missing; "
                "download the complete checkpoint"
            )
        return [directory / name for name in names]
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    others = sorted(directory.glob("*.safetensors"))
    if len(others) == 1:
        return others
    raise SourceError(
        f"source {label}: no {SINGLE_FILE} or {INDEX_FILE} in {directory}; "
        "point at a Hugging Face checkpoint directory saved with safetensors"
    )


def _tensor_table(label: str, directory: Path) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for path in safetensors_files(label, directory):
        try:
            header = read_header(path)
        except SourceError as error:
            raise SourceError(f"source {label}: {error}") from None
        for name, info in header.items():
            if name in tensors:
                raise SourceError(
                    f"source {label}: tensor {name} appears in two shards "
                    f"({Path(tensors[name].file).name}, {path.name}); re-save the checkpoint"
                )
            tensors[name] = info
    return tensors


def _read_config(label: str, directory: Path) -> dict[str, Any]:
    config_path = directory / "config.json"
    if not config_path.exists():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError:
        raise SourceError(
            f"source {label}: {config_path} is not valid JSON; fix or re-download it"
        ) from None
    return config if isinstance(config, dict) else {}


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor from its memory-mapped shard; the mapping is closed before returning."""
    with safe_open(info.file, framework="pt", device="cpu") as handle:
        return handle.get_tensor(info.name)
