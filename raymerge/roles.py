"""Tensor roles from name patterns (data, not branches): which block a tensor belongs to, which
tensors are kept out of spectral steps, and which are indexed by the vocabulary."""

from __future__ import annotations

import re

# Names kept out of every spectral step by default: embeddings and output heads.
DEFAULT_EXCLUDE = ["embed_tokens", "lm_head", "wte", "wpe", "embeddings"]

# "model.layers.12.mlp.up_proj.weight" -> block "model.layers.12"; covers Llama/Mistral/Qwen
# (layers), GPT-2/Falcon (h), BERT (encoder.layer), T5 (block) and most others.
BLOCK_PATTERN = re.compile(r"^(?P<block>(?:.*?\.)?(?:layers|layer|h|blocks|block)\.\d+)\.")


# Tensors outside the blocks that come after them (final norm, output head), as mergekit's
# post-layer weights: with slices they come from the last slice, the others from the first.
AFTER_BLOCKS_PATTERN = re.compile(
    r"(?:^|\.)(?:norm|norm_f|final_norm|final_layernorm|final_layer_norm|ln_f|lm_head|"
    r"embed_out|output|output_layer)\.(?:weight|bias)$")


def is_after_blocks(tensor_name: str) -> bool:
    return block_of(tensor_name) is None and AFTER_BLOCKS_PATTERN.search(tensor_name) is not None


# Tensors indexed by token id (input embeddings, output heads and their biases): the modules
# whose `.weight` / `.bias` they are, matched at the end of the name. The vocabulary axis is then
# the dimension whose size is the checkpoint's vocabulary (raymerge.vocabulary).
VOCABULARY_MODULES = (
    "embed_tokens", "lm_head",  # Llama, Mistral, Qwen, Gemma, Phi, their MoE models, OPT, T5
    "wte",  # GPT-2, MPT
    "word_embeddings",  # Falcon, Bloom, BERT
    "embed_in", "embed_out",  # GPT-NeoX
    "tok_embeddings",  # InternLM2 (its head is the top-level "output", below)
    "output_layer",  # ChatGLM
    "shared",  # T5's shared embedding
    "predictions", "predictions.decoder",  # BERT's masked-LM head
    "shared_head.head",  # DeepSeek-V3's multi-token-prediction head
    "backbone.embeddings",  # Mamba
)
TOP_LEVEL_VOCABULARY_MODULES = ("output",)
VOCABULARY_PATTERN = re.compile(
    "(?:" + "|".join(f"^{re.escape(m)}" for m in TOP_LEVEL_VOCABULARY_MODULES) + "|"
    + "|".join(f"(?:^|\\.){re.escape(m)}" for m in VOCABULARY_MODULES) + r")\.(?:weight|bias)$")


# Expert stacks [E, m, n] hold one matrix per expert (GPT-OSS: mlp.experts.gate_up_proj).
EXPERT_STACK_PATTERN = re.compile(r"(?:^|\.)experts\.")
# Biases are vectors (a stack of per-expert biases [E, n] too), never a matrix's map.
BIAS_PATTERN = re.compile(r"(?:^|[._])bias$")


def is_bias(tensor_name: str) -> bool:
    return BIAS_PATTERN.search(tensor_name) is not None


def is_expert_stack_name(tensor_name: str) -> bool:
    return EXPERT_STACK_PATTERN.search(tensor_name) is not None


def is_vocabulary_role(tensor_name: str) -> bool:
    """Whether the name is that of a tensor indexed by token id (the shape decides the axis)."""
    return VOCABULARY_PATTERN.search(tensor_name) is not None


def block_of(tensor_name: str) -> str | None:
    match = BLOCK_PATTERN.match(tensor_name)
    return match.group("block") if match else None


def natural_key(name: str) -> tuple:
    """Sort 'layers.10' after 'layers.9'."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def is_excluded(tensor_name: str, exclude_patterns: list[str]) -> bool:
    return any(re.search(pattern, tensor_name) for pattern in exclude_patterns)


def layer_positions(names) -> dict[str, float]:
    """Each tensor's position t ∈ [0, 1] in its stack of blocks, as mergekit interpolates
    gradients: block i of L at i / (L − 1), 1 when L = 1 (blocks counted in order of their
    index, per stack: a vision tower's layers apart from the language model's); 0 outside
    blocks (embeddings, final norm, head), as mergekit's pre- and post-layer weights."""
    blocks = {name: block_of(name) for name in names}
    stacks: dict[str, set[int]] = {}
    for block in filter(None, blocks.values()):
        stack, _, index = block.rpartition(".")
        stacks.setdefault(stack, set()).add(int(index))
    ranks = {stack: {index: rank for rank, index in enumerate(sorted(indices))}
             for stack, indices in stacks.items()}
    positions = {}
    for name, block in blocks.items():
        if block is None:
            positions[name] = 0.0
            continue
        stack, _, index = block.rpartition(".")
        count = len(ranks[stack])
        positions[name] = ranks[stack][int(index)] / (count - 1) if count > 1 else 1.0
    return positions
