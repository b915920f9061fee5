"""The non-weight files of the output checkpoint: config, tokenizer, recipe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from raymerge.dtypes import CODE_TO_RECIPE

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)


def write_config(base_directory: Path, output_directory: Path, dtype_codes: set[str]) -> None:
    """The base's config.json with its dtype set to the output's (when the output has one)."""
    source = base_directory / "config.json"
    if not source.exists():
        return
    config = json.loads(source.read_text())
    if len(dtype_codes) == 1:
        dtype_name = CODE_TO_RECIPE[next(iter(dtype_codes))]
        keys = [key for key in ("torch_dtype", "dtype") if key in config] or ["torch_dtype"]
        for key in keys:
            config[key] = dtype_name
    (output_directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def copy_tokenizer(base_directory: Path, output_directory: Path) -> list[str]:
    copied = []
    for path in sorted(base_directory.iterdir()):
        if path.name in TOKENIZER_FILES or path.suffix == ".tiktoken":
            shutil.copy2(path, output_directory / path.name)
            copied.append(path.name)
    return copied
