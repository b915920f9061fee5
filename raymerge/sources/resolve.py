"""Turn what the user wrote (a directory, an object-store prefix, a Hub id) into a Checkpoint."""

from __future__ import annotations

from pathlib import Path

from raymerge.errors import SourceError
from raymerge.sources.checkpoint import PICKLE_FILES, Checkpoint, safetensors_files
from raymerge.sources.lora import LoraAdapter, is_lora_directory, open_lora
from raymerge.sources.pickle_convert import convert_pickle_checkpoint
from raymerge.sources.remote import open_remote
from raymerge.store import StorageSettings, open_store


def resolve_checkpoint(
    label: str, allow_pickle: bool = False, pickle_cache: Path | None = None,
    storage: StorageSettings | None = None,
) -> Checkpoint | LoraAdapter:
    """A local directory, an object-store prefix (s3://, gs://, abfs://) or a Hub repo
    'org/name[@revision]' (also hf://org/name[@revision]). A store's checkpoint is opened from
    its metadata alone (raymerge.sources.remote): nothing is downloaded whole. A directory with
    an adapter_config.json is a PEFT LoRA adapter."""
    store = open_store(label, storage)
    if store.remote:
        return open_remote(store, storage or StorageSettings())
    directory, revision = store.directory, store.revision
    if is_lora_directory(directory):
        return open_lora(label, directory, revision)
    if _has_pickle_only(directory):
        if not allow_pickle:
            raise SourceError(
                f"source {label}: only a pickle checkpoint (pytorch_model.bin), which can run "
                "code when loaded; convert it to safetensors or pass --allow-pickle"
            )
        directory = convert_pickle_checkpoint(label, directory, pickle_cache)
    return Checkpoint.open(label, directory, revision)


def _has_pickle_only(directory: Path) -> bool:
    try:
        safetensors_files(str(directory), directory)
        return False
    except SourceError:
        return any((directory / name).exists() for name in PICKLE_FILES)
