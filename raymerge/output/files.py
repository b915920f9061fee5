"""The non-weight files of the output checkpoint: config.json, and every other file the base
carries beside its weights and tokenizer (generation config, sentence-transformers modules,
processor configs, custom code ...), directories included."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from raymerge.dtypes import CODE_TO_RECIPE
from raymerge.sources.tokenizer_files import TOKENIZER_FILES, is_tokenizer_file

__all__ = ["TOKENIZER_FILES", "copy_checkpoint_files", "copy_tokenizer", "module_weights",
           "remap_token_ids", "write_config"]

# Written by raymerge itself, or describing another merge: never copied from the base.
OWN_FILES = frozenset({
    "config.json", "README.md", "raymerge_recipe.yaml", "raymerge_manifest.json",
    "raymerge_stats.parquet", "raymerge_progress.jsonl", "spectral_factors",
})
# The base's weights, in any format: the merge writes its own. At the top level every weight
# file is one of the checkpoint's; in a subdirectory only exports of the whole model are (ONNX,
# GGUF, ...: stale once merged), while module weights (sentence-transformers' 2_Dense/) are
# copied as the base's and listed as such.
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
                             ".gguf", ".onnx", ".onnx_data", ".tflite", ".ot", ".mlmodel"})
EXPORT_SUFFIXES = frozenset({".gguf", ".onnx", ".onnx_data", ".tflite", ".mlmodel"})
EXPORT_DIRECTORIES = frozenset({"onnx", "openvino", "coreml", "tflite", "gguf"})
# config keys holding token ids (config.json, text_config, generation_config.json)
_TOKEN_ID_SUFFIX = "_token_id"


def write_config(base_directory: Path, output_directory: Path, dtype_codes: set[str],
                 vocabulary_rows: int | None = None,
                 token_ids: Callable[[int], int | None] | None = None) -> None:
    """The base's config.json with its dtype set to the output's (when the floating-point
    tensors share one), its vocabulary size (and text_config's) set to `vocabulary_rows`, and
    its special-token ids passed through `token_ids` (a base id -> the output's)."""
    source = base_directory / "config.json"
    if not source.exists():
        return
    config = json.loads(source.read_text())
    float_codes = {code for code in dtype_codes if code in CODE_TO_RECIPE}
    if len(float_codes) == 1:
        dtype_name = CODE_TO_RECIPE[next(iter(float_codes))]
        keys = [key for key in ("torch_dtype", "dtype") if key in config] or ["torch_dtype"]
        for key in keys:
            config[key] = dtype_name
    if vocabulary_rows is not None:
        text_config = config.get("text_config")
        nested = isinstance(text_config, dict) and "vocab_size" in text_config
        if nested:
            text_config["vocab_size"] = vocabulary_rows
        if "vocab_size" in config or not nested:
            config["vocab_size"] = vocabulary_rows
    if token_ids is not None:
        config = remap_token_ids(config, token_ids)
    (output_directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def remap_token_ids(config: dict, token_ids: Callable[[int], int | None]) -> dict:
    """Every `*_token_id` value (an id or a list of them, nested configs included) through
    `token_ids`; an id it has no answer for is kept."""

    def remap(value):
        if isinstance(value, bool) or not isinstance(value, (int, list)):
            return value
        if isinstance(value, list):
            return [remap(item) for item in value]
        mapped = token_ids(value)
        return value if mapped is None else mapped

    result = {}
    for key, value in config.items():
        if isinstance(value, dict):
            result[key] = remap_token_ids(value, token_ids)
        elif key.endswith(_TOKEN_ID_SUFFIX):
            result[key] = remap(value)
        else:
            result[key] = value
    return result


def copy_tokenizer(base_directory: Path, output_directory: Path) -> list[str]:
    """The tokenizer files of a checkpoint, as they are."""
    copied = []
    for path in sorted(base_directory.iterdir()):
        if is_tokenizer_file(path):
            _copy(path, output_directory / path.name)
            copied.append(path.name)
    return copied


def copy_checkpoint_files(base_directory: Path, output_directory: Path) -> list[str]:
    """Everything the base carries beside its weights, its tokenizer and the files raymerge
    writes itself, directories included; hidden files (.gitattributes, .cache/) are not
    copied. Returns the paths copied, relative to the checkpoint, sorted."""
    copied = []
    for path in sorted(base_directory.iterdir()):
        name = path.name
        if name.startswith(".") or name in OWN_FILES or is_tokenizer_file(path):
            continue
        if path.is_dir():
            if name not in EXPORT_DIRECTORIES:
                copied += _copy_directory(path, base_directory, output_directory)
        elif path.suffix not in WEIGHT_SUFFIXES and not name.endswith(".index.json"):
            _copy(path, output_directory / name)
            copied.append(name)
    return sorted(copied)


def module_weights(copied: list[str]) -> list[str]:
    """The copied files that are weights of a module beside the model (the base's, unmerged)."""
    return [path for path in copied if Path(path).suffix in WEIGHT_SUFFIXES]


def _copy_directory(directory: Path, root: Path, output_directory: Path) -> list[str]:
    copied = []
    for folder, folders, files in os.walk(directory):
        folders[:] = sorted(f for f in folders
                            if not f.startswith(".") and f not in EXPORT_DIRECTORIES)
        for file_name in sorted(files):
            path = Path(folder) / file_name
            if file_name.startswith(".") or path.suffix in EXPORT_SUFFIXES:
                continue
            relative = path.relative_to(root)
            _copy(path, output_directory / relative)
            copied.append(str(relative))
    return copied


def _copy(path: Path, target: Path) -> None:
    """A file (the content a symlink points at, as in a Hub cache) or a directory."""
    if path.is_dir():
        shutil.copytree(path, target, dirs_exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
