"""Opt-in conversion of pickle checkpoints (pytorch_model.bin) to safetensors, weights only."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from raymerge.errors import SourceError


def convert_pickle_checkpoint(label: str, directory: Path, cache: Path | None) -> Path:
    """Write a safetensors copy of a pickle checkpoint into the cache and return its directory.

    Only called with --allow-pickle. `weights_only=True` keeps torch.load from running code."""
    directory = directory.resolve()
    cache = cache or Path(os.environ.get("RAYMERGE_CACHE", Path.home() / ".cache" / "raymerge"))
    # Keyed by path, size and mtime of every pickle file: a changed checkpoint converts anew.
    stamp = [str(directory)] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                for p in sorted(directory.glob("pytorch_model*"))]
    target = cache / "converted" / hashlib.sha256("|".join(stamp).encode()).hexdigest()[:16]
    if (target / "model.safetensors.index.json").exists():
        return target
    index_path = directory / "pytorch_model.bin.index.json"
    if index_path.exists():
        shard_names = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    else:
        shard_names = ["pytorch_model.bin"]
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for number, shard_name in enumerate(shard_names, start=1):
        try:
            state = torch.load(directory / shard_name, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a bad pickle
            shutil.rmtree(staging, ignore_errors=True)
            raise SourceError(
                f"source {label}: cannot load {shard_name} safely ({error})"
            ) from None
        out_name = f"model-{number:05d}-of-{len(shard_names):05d}.safetensors"
        tensors = {name: tensor.contiguous() for name, tensor in state.items()}
        save_file(tensors, staging / out_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, out_name))
        del state, tensors
    (staging / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
    )
    for extra in directory.iterdir():
        if extra.suffix in (".json", ".txt", ".model") and not extra.name.startswith("pytorch_"):
            shutil.copy2(extra, staging / extra.name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target
