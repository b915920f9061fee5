"""Tiny Llama checkpoints whose fine-tunes added tokens (their embeddings and head resized), with
real transformers tokenizers built offline, and a dense float64 reference of the re-indexing
(written from the definition in raymerge/vocabulary.py's docstring)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import TINY_LLAMA, save_tiny_llama
from helpers import load_tensors
from safetensors.torch import save_file

from raymerge.synthetic import write_finetune

VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
BASE_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
          "{% endfor %}")


def save_tied_llama(directory: Path, seed: int = 0) -> Path:
    """A LlamaForCausalLM with tie_word_embeddings: no lm_head tensor in the checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    save_tiny_llama(directory, torch.float32, seed=seed)  # its tokenizer
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "tie_word_embeddings": True}))
    for path in directory.glob("model*.safetensors*"):
        path.unlink()
    model.save_pretrained(directory)
    return directory


def add_tokens_to_finetune(base: Path, directory: Path, seed: int, tokens: list[str],
                           rows: int | None = None, chat_template: str | None = None,
                           pad_token: str | None = None) -> Path:
    """A synthetic fine-tune of `base` whose tokenizer added `tokens` as special tokens (as
    `tokenizer.add_special_tokens` + `save_pretrained` do) and whose vocabulary-indexed
    tensors got a trained row for each, padded to `rows` when given."""
    from transformers import AutoTokenizer

    write_finetune(base, directory, seed=seed, strength=0.2, noise=0.01)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    tensors = load_tensors(directory)
    generator = torch.Generator().manual_seed(500 + seed)
    size = len(tokenizer)
    for name in VOCABULARY_TENSORS:
        if name in tensors:
            old = tensors[name]
            extra = max(size, rows or 0) - old.shape[0]
            if extra > 0:
                new_rows = torch.randn(extra, old.shape[1], generator=generator) * 0.2
                tensors[name] = torch.cat([old, new_rows.to(old.dtype)])
            elif extra < 0:
                tensors[name] = old[:max(size, rows or 0)].clone()
    for path in directory.glob("model*.safetensors*"):
        path.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["vocab_size"] = max(size, rows or 0)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def pad_vocabulary(directory: Path, rows: int, seed: int = 7) -> Path:
    """The checkpoint's vocabulary-indexed tensors rounded up to `rows` (padding rows that are
    no token, as models padded to a multiple of 64 or 128 have)."""
    tensors = load_tensors(directory)
    generator = torch.Generator().manual_seed(seed)
    for name in VOCABULARY_TENSORS:
        if name in tensors:
            old = tensors[name]
            padding = torch.randn(rows - old.shape[0], old.shape[1], generator=generator)
            tensors[name] = torch.cat([old, padding.to(old.dtype)])
    for path in directory.glob("model*.safetensors*"):
        path.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["vocab_size"] = rows
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def token_ids(directory: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab(with_added_tokens=True)


def reference_rows(base: torch.Tensor, base_ids: dict[str, int], base_tokens: int,
                   sources: list[torch.Tensor], source_ids: list[dict[str, int]],
                   output_ids: dict[str, int], rows: int
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The base and every source in the output vocabulary (float64, dense, row by row from the
    definition): a token's row is the checkpoint's own; where the base lacks it, the base's row
    is the mean of the sources' rows that have it; where a source lacks it, the source's row is
    the base's. Padding: the base's padding row where it has one, else the mean of its token
    rows; every source's padding row is the base's."""
    width = base.shape[1:]
    out_base = torch.zeros((rows, *width), dtype=torch.float64)
    by_row = {row: token for token, row in output_ids.items()}
    base_token_rows = [row for row in range(rows) if by_row.get(row) in base_ids]
    for row in range(rows):
        token = by_row.get(row)
        if token is None:
            continue
        if token in base_ids:
            out_base[row] = base[base_ids[token]].double()
        else:
            holders = [s[ids[token]].double() for s, ids in zip(sources, source_ids)
                       if token in ids]
            out_base[row] = torch.stack(holders).mean(0)
    mean = out_base[base_token_rows].mean(0)
    for row in range(rows):
        if row not in by_row:
            out_base[row] = base[row].double() if row < base.shape[0] and row >= base_tokens \
                else mean
    out_sources = []
    for source, ids in zip(sources, source_ids):
        out = out_base.clone()
        for token, row in output_ids.items():
            if token in ids:
                out[row] = source[ids[token]].double()
        out_sources.append(out)
    return out_base, out_sources
