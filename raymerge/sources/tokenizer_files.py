"""A checkpoint's tokenizer files: which they are, its token table and its chat template.

Read with the `tokenizers` library from tokenizer.json (fast, no model code); a directory with
only a slow tokenizer (vocab.txt, tokenizer.model, vocab.json + merges.txt) is read through
transformers' AutoTokenizer, which converts it (never with remote code)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raymerge.errors import SourceError
from raymerge.vocabulary import TokenTable

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
# The files that make up a tokenizer: they come from the checkpoint whose vocabulary the
# output takes. (Top-level *.model and *.tiktoken files are tokenizers too.)
TOKENIZER_FILES = (
    TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, "tokenizer.model", "vocab.json",
    "merges.txt", "vocab.txt", ADDED_TOKENS, CHAT_TEMPLATE_JINJA, CHAT_TEMPLATE_JSON,
    "spiece.model", "sentencepiece.bpe.model", "additional_chat_templates",
)
# Files whose content is the vocabulary itself (the rest configure it)
_VOCABULARY_FILES = (TOKENIZER_JSON, "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                     ADDED_TOKENS, "spiece.model", "sentencepiece.bpe.model")
SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")
# where tokenizer configs list additional special tokens (transformers 4, transformers 5)
LISTED_SPECIAL = ("additional_special_tokens", "extra_special_tokens")
_ATTRIBUTES = ("special", "normalized", "lstrip", "rstrip", "single_word")


def is_tokenizer_file(path: Path) -> bool:
    """A top-level entry of a checkpoint directory that belongs to its tokenizer."""
    return path.name in TOKENIZER_FILES or (path.is_file() and path.suffix in (".model",
                                                                             ".tiktoken"))


def tokenizer_paths(directory: Path) -> list[Path]:
    return [path for path in sorted(directory.iterdir()) if is_tokenizer_file(path)]


def has_vocabulary(directory: Path) -> bool:
    """Whether the directory holds a tokenizer's vocabulary (not only its config)."""
    return any((directory / name).exists() for name in _VOCABULARY_FILES) or any(
        directory.glob("*.tiktoken"))


def vocabulary_digest(directory: Path) -> str:
    """sha256 over the files holding the vocabulary: equal digests, equal vocabularies (a cheap
    test before reading the tokenizers)."""
    digest = hashlib.sha256()
    for name in _VOCABULARY_FILES:
        path = directory / name
        if path.exists():
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def read_token_table(label: str, directory: Path) -> TokenTable:
    """The tokenizer's tokens (added tokens included) with their ids, the added tokens'
    attributes and the special-token roles; SourceError where it cannot be read."""
    config = read_json(label, directory / TOKENIZER_CONFIG)
    if (directory / TOKENIZER_JSON).exists():
        tokens, added = _from_tokenizer_json(label, directory / TOKENIZER_JSON)
    else:
        tokens, added = _from_transformers(label, directory)
    roles = {}
    special_map = read_json(label, directory / SPECIAL_TOKENS_MAP)
    for role in SPECIAL_ROLES:
        content = _content(config.get(role, special_map.get(role)))
        if content in tokens:
            roles[role] = content
    listed = [_content(value) for file in (config, special_map) for key in LISTED_SPECIAL
              for value in (file.get(key) if isinstance(file.get(key), list) else [])]
    return TokenTable(tokens=tokens, added=added, roles=roles,
                      listed_special=tuple(dict.fromkeys(t for t in listed if t in tokens)))


def _content(value: Any) -> str | None:
    """A special token as tokenizer configs write it: a string or an AddedToken's mapping."""
    content = value.get("content") if isinstance(value, dict) else value
    return content if isinstance(content, str) else None


def _from_tokenizer_json(label: str, path: Path) -> tuple[dict[str, int], dict[str, dict]]:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust library raises plain Exceptions
        raise SourceError(f"source {label}: cannot read {path} ({_first_line(error)}); "
                          "re-save the tokenizer with transformers") from None
    added = {token.content: {key: bool(getattr(token, key)) for key in _ATTRIBUTES}
             for token in tokenizer.get_added_tokens_decoder().values()}
    return tokenizer.get_vocab(with_added_tokens=True), added


def _from_transformers(label: str, directory: Path) -> tuple[dict[str, int], dict[str, dict]]:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise SourceError(f"source {label}: its tokenizer has no {TOKENIZER_JSON}; install "
                          "transformers to read it, or save it with tokenizer.json") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), use_fast=True,
                                                  trust_remote_code=False)
    except Exception as error:  # transformers raises many kinds here
        raise SourceError(f"source {label}: cannot read its tokenizer ({_first_line(error)}); "
                          "re-save it with transformers (tokenizer.json)") from None
    added = {token.content: {key: bool(getattr(token, key)) for key in _ATTRIBUTES}
             for token in tokenizer.added_tokens_decoder.values()}
    return dict(tokenizer.get_vocab()), added


@dataclass(frozen=True)
class ChatTemplate:
    """The output's chat template and where to store it."""

    template: Any  # a Jinja string, or a list of named templates
    style: str  # "jinja" (chat_template.jinja), "json" (chat_template.json), "config"
    origin: str  # "base", a source's path as the recipe writes it, or "recipe"


def read_chat_template(label: str, directory: Path) -> tuple[Any, str | None]:
    """(template, where it is stored: "jinja" | "json" | "config"), or (None, None). The
    template is a string, or a list of named templates (tokenizer_config.json only)."""
    if (directory / CHAT_TEMPLATE_JINJA).exists():
        return (directory / CHAT_TEMPLATE_JINJA).read_text(), "jinja"
    stored = read_json(label, directory / CHAT_TEMPLATE_JSON)
    if stored.get("chat_template"):
        return stored["chat_template"], "json"
    config = read_json(label, directory / TOKENIZER_CONFIG)
    if config.get("chat_template"):
        return config["chat_template"], "config"
    return None, None


def read_json(label: str, path: Path) -> dict[str, Any]:
    """A JSON object file ({} where absent); SourceError naming it where it is not JSON."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SourceError(f"source {label}: {path} is not valid JSON; fix or re-download "
                          "it") from None
    return data if isinstance(data, dict) else {}


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
