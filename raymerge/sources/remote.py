"""A checkpoint or LoRA adapter in a store (s3://, gs://, a Hub repo), opened on the driver from
its metadata alone: the small files (config, tokenizer, index, adapter config) are fetched into
a local folder, the safetensors headers are read by range, and no weight byte is read. Tasks
read their tensors' byte ranges themselves, on their own nodes, by the URIs kept in each
TensorInfo."""

from __future__ import annotations

import json
from pathlib import Path

from raymerge.errors import SourceError
from raymerge.sources.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, _read_config
from raymerge.sources.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter, open_lora
from raymerge.sources.safetensors_header import TensorInfo, read_header_from
from raymerge.store import WEIGHT_SUFFIXES, FileFacts, StorageSettings, Store
from raymerge.store.download import copy_files

SMALL_FILE_LIMIT = 64 << 20  # a tokenizer.json is tens of MB; anything larger is not metadata


def metadata_folder(store: Store, files: dict[str, FileFacts]) -> Path:
    """A local folder with the store's small files (config, tokenizer, index, adapter config),
    fetched once per content."""
    small = {name: facts for name, facts in files.items()
             if not name.endswith(WEIGHT_SUFFIXES) and facts.size <= SMALL_FILE_LIMIT}
    return copy_files(store, small, "stores")


def open_remote(store: Store, storage: StorageSettings) -> Checkpoint | LoraAdapter:
    label = store.label
    files = store.files()
    if not files:
        raise SourceError(f"source {label}: nothing there (no objects under this prefix); "
                          "check the URI")
    folder = metadata_folder(store, files)
    revision = getattr(store, "revision", None)
    if ADAPTER_CONFIG in files:
        if ADAPTER_WEIGHTS not in files:
            raise SourceError(f"source {label}: no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG}; "
                              "save the adapter with safetensors")
        header = _header(store, label, ADAPTER_WEIGHTS, files[ADAPTER_WEIGHTS])
        adapter = open_lora(label, folder, revision, header=header)
        adapter.facts = {store.uri(ADAPTER_WEIGHTS): files[ADAPTER_WEIGHTS]}
        adapter.storage = storage
        return adapter
    names = _weight_files(label, folder, files)
    tensors: dict[str, TensorInfo] = {}
    for name in names:
        for tensor, info in _header(store, label, name, files[name]).items():
            if tensor in tensors:
                raise SourceError(f"source {label}: tensor {tensor} appears in two shards; "
                                  "re-save the checkpoint")
            tensors[tensor] = info
    return Checkpoint(label=label, directory=folder, tensors=tensors,
                      config=_read_config(label, folder), revision=revision,
                      facts={store.uri(name): files[name] for name in names}, storage=storage)


def _weight_files(label: str, folder: Path, files: dict[str, FileFacts]) -> list[str]:
    if (folder / INDEX_FILE).exists():
        try:
            names = sorted(set(json.loads((folder / INDEX_FILE).read_text())["weight_map"]
                               .values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise SourceError(f"source {label}: {INDEX_FILE} is not a valid safetensors index; "
                              "re-save it") from None
        missing = [name for name in names if name not in files]
        if missing:
            raise SourceError(f"source {label}: shard {missing[0]} listed in {INDEX_FILE} is "
                              "missing; upload the complete checkpoint")
        return names
    if SINGLE_FILE in files:
        return [SINGLE_FILE]
    others = sorted(name for name in files if name.endswith(".safetensors") and "/" not in name)
    if len(others) == 1:
        return others
    if any(name.endswith(".bin") for name in files):
        raise SourceError(f"source {label}: only a pickle checkpoint (pytorch_model.bin); "
                          "convert it to safetensors (pickle checkpoints are read from local "
                          "directories only)")
    raise SourceError(f"source {label}: no {SINGLE_FILE} or {INDEX_FILE}; point at a Hugging "
                      "Face checkpoint saved with safetensors")


def _header(store: Store, label: str, name: str, facts: FileFacts) -> dict[str, TensorInfo]:
    source = store.open(name)
    try:
        return read_header_from(source, facts.size, store.uri(name))
    except SourceError as error:
        raise SourceError(f"source {label}: {error}") from None
    finally:
        source.close()
