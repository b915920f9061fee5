"""Turn what the user wrote (a directory or a Hub id) into a local Checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

from raymerge.errors import SourceError
from raymerge.sources.checkpoint import PICKLE_FILES, Checkpoint, safetensors_files
from raymerge.sources.lora import LoraAdapter, is_lora_directory, open_lora
from raymerge.sources.pickle_convert import convert_pickle_checkpoint

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# weights, configs (sentence-transformers' 1_Pooling/config.json too), tokenizers, chat
# templates, and a remote-code model's code (copied to the output, never run)
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt",
                "*.jinja", "*.py"]


def resolve_checkpoint(
    label: str, allow_pickle: bool = False, pickle_cache: Path | None = None
) -> Checkpoint | LoraAdapter:
    """A local directory, or a Hub repo 'org/name[@revision]' downloaded (weights, configs and
    tokenizer files only) into the Hugging Face cache with its revision pinned. A directory with
    an adapter_config.json is a PEFT LoRA adapter."""
    path = Path(label).expanduser()
    revision = None
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"source {label}: is a file; point at the checkpoint's directory")
        directory = path
    elif _HUB_ID.match(label) and not label.startswith((".", "/", "~")):
        directory, revision = _download_from_hub(label)
    else:
        raise SourceError(f"source {label}: not found; give an existing directory or 'org/name'")
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


def _download_from_hub(label: str) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = label.partition("@")
    try:
        directory = Path(
            snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS)
        )
    except RevisionNotFoundError:
        raise SourceError(
            f"source {label}: revision {revision!r} does not exist on the Hub; check it"
        ) from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"source {label}: no such Hub repository (or it is private: run `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        raise SourceError(
            f"source {label}: not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline?); download it first or give a local directory"
        ) from None
    except OSError as error:
        raise SourceError(
            f"source {label}: download failed ({error}); retry or check the id"
        ) from None
    # The snapshot folder is named by the commit hash: that pins the revision in the manifest.
    return directory, directory.name
