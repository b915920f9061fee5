"""Where models live: one interface (raymerge.store.base.Store) over local directories,
object-store prefixes (s3://, gs://, abfs://) and Hub repos. `open_store` turns what the user
wrote into a store; `open_bytes` opens a file by the URI a store gave it, on any node."""

from __future__ import annotations

from pathlib import Path

from raymerge.errors import SourceError
from raymerge.store.base import (
    WEIGHT_SUFFIXES,
    ByteSource,
    FileFacts,
    Store,
    StoreUnavailableError,
)
from raymerge.store.hub import HttpFile, HubStore, cached_snapshot, is_hub_id
from raymerge.store.local import LocalFile, LocalStore
from raymerge.store.objects import ObjectFile, ObjectStore, read_object, scheme_of
from raymerge.store.settings import StorageSettings

__all__ = ["WEIGHT_SUFFIXES", "ByteSource", "FileFacts", "StorageSettings", "Store",
           "StoreUnavailableError", "is_remote", "join", "open_bytes", "open_store", "read_text"]


def is_remote(location: str) -> bool:
    """Whether a location names an object-store prefix or a Hub repo (not a local path)."""
    if scheme_of(location) or location.startswith("hf://"):
        return True
    return not Path(location).expanduser().exists() and is_hub_id(location)


def open_store(location: str, storage: StorageSettings | None = None) -> Store:
    """The store a source, base or output location names; SourceError in one line when it
    names nothing."""
    storage = storage or StorageSettings()
    if scheme_of(location):
        return ObjectStore(location, storage)
    path = Path(location).expanduser()
    if path.exists() and not location.startswith("hf://"):
        if not path.is_dir():
            raise SourceError(f"source {location}: is a file; point at the checkpoint's "
                              "directory")
        return LocalStore(location, path)
    if is_hub_id(location):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:  # offline: the snapshot in the local Hugging Face cache
            return cached_snapshot(location)
        return HubStore(location, storage)
    raise SourceError(f"source {location}: not found; give an existing directory, "
                      "s3://bucket/prefix, gs://bucket/prefix or a Hub id 'org/name[@revision]'")


def open_bytes(uri: str, storage: StorageSettings | None = None) -> ByteSource:
    """A file named by a store's URI, opened on this node."""
    storage = storage or StorageSettings()
    if scheme_of(uri):
        return ObjectFile(uri, storage)
    if uri.startswith(("https://", "http://")):
        return HttpFile(uri, storage)
    return LocalFile(uri)


def read_text(location: str, storage: StorageSettings | None = None) -> str:
    """A small text file (a recipe, a registry) from a local path or an object-store URI;
    FileNotFoundError when there is none, OSError (secrets blanked) when the store refuses."""
    if not scheme_of(location):
        return Path(location).expanduser().read_text()
    return read_object(location, storage or StorageSettings()).decode()


def join(root: str | Path, name: str) -> str:
    """`name` relative to a directory or an object-store prefix (an absolute name or URI as
    it is)."""
    if scheme_of(name) or Path(name).is_absolute():
        return name
    if scheme_of(str(root)):
        return f"{str(root).rstrip('/')}/{name}"
    return str(Path(root) / name)
