"""Tensor roles from name patterns (data, not branches): which block a tensor belongs to, and
which tensors are kept out of spectral steps."""

from __future__ import annotations

import re

# "model.layers.12.mlp.up_proj.weight" -> block "model.layers.12"; covers Llama/Mistral/Qwen
# (layers), GPT-2/Falcon (h), BERT (encoder.layer), T5 (block) and most others.
BLOCK_PATTERN = re.compile(r"^(?P<block>(?:.*?\.)?(?:layers|layer|h|blocks|block)\.\d+)\.")


def block_of(tensor_name: str) -> str | None:
    match = BLOCK_PATTERN.match(tensor_name)
    return match.group("block") if match else None


def natural_key(name: str) -> tuple:
    """Sort 'layers.10' after 'layers.9'."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def is_excluded(tensor_name: str, exclude_patterns: list[str]) -> bool:
    return any(re.search(pattern, tensor_name) for pattern in exclude_patterns)
