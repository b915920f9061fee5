"""The output's tokenizer: the files of the checkpoint whose vocabulary the output takes, with
the union's new tokens appended (tokenizer.json and the configs that list added and special
tokens), and the chosen chat template stored where the base stores its own.

The base's files are edited, not re-serialized by transformers, so that the output keeps the
base's tokenizer class and loads with the transformers versions the base loads with."""

from __future__ import annotations

import json
from pathlib import Path

from raymerge.errors import SourceError
from raymerge.output.files import copy_tokenizer
from raymerge.sources.tokenizer_files import (
    ADDED_TOKENS,
    CHAT_TEMPLATE_JINJA,
    CHAT_TEMPLATE_JSON,
    LISTED_SPECIAL,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    ChatTemplate,
    is_tokenizer_file,
)
from raymerge.vocabulary import OutputVocabulary


def extended_tokenizer_json(label: str, directory: Path, vocabulary: OutputVocabulary) -> str:
    """The tokenizer.json of `directory` (the base's) with the union's new tokens appended,
    checked to give each token the id the merge puts its rows at. Built before merging, so a
    tokenizer that cannot be extended fails before any heavy work."""
    from tokenizers import AddedToken, Tokenizer

    if (directory / TOKENIZER_JSON).exists():
        tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_JSON))
    else:
        tokenizer = _converted(label, directory)
    for token, _, attributes in vocabulary.appended:
        added = AddedToken(token, **attributes)
        if attributes.get("special"):
            tokenizer.add_special_tokens([added])
        else:
            tokenizer.add_tokens([added])
        if tokenizer.token_to_id(token) != vocabulary.tokens[token]:
            raise SourceError(
                f"source {label}: its tokenizer gives the new token {token!r} id "
                f"{tokenizer.token_to_id(token)}, not {vocabulary.tokens[token]} after its last "
                "token (its ids have gaps?); use tokenizer.source: a source's path instead")
    return tokenizer.to_str(pretty=True)


def _converted(label: str, directory: Path):
    """A slow-only tokenizer (vocab.txt, tokenizer.model) as a tokenizers.Tokenizer."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory), use_fast=True,
                                             trust_remote_code=False).backend_tokenizer
    except Exception as error:  # ImportError, or anything transformers raises
        raise SourceError(f"source {label}: cannot convert its tokenizer to tokenizer.json to "
                          f"add tokens ({error.__class__.__name__}); save it with tokenizer.json"
                          ) from None


def write_tokenizer(output_directory: Path, vocabulary_directory: Path,
                    vocabulary: OutputVocabulary | None, tokenizer_json: str | None,
                    chat_template: ChatTemplate | None) -> list[str]:
    """The output's tokenizer files; returns their names."""
    copy_tokenizer(vocabulary_directory, output_directory)
    if vocabulary is not None and tokenizer_json is not None:
        (output_directory / TOKENIZER_JSON).write_text(tokenizer_json)
        _list_appended_tokens(output_directory, vocabulary)
    if chat_template is not None:
        write_chat_template(output_directory, chat_template)
    return sorted(path.name for path in output_directory.iterdir() if is_tokenizer_file(path))


def _list_appended_tokens(directory: Path, vocabulary: OutputVocabulary) -> None:
    """tokenizer_config.json, special_tokens_map.json and added_tokens.json list the appended
    tokens as the base's files list theirs; roles the base lacks (a pad token) are set."""
    config_path = directory / TOKENIZER_CONFIG
    if config_path.exists():
        config = json.loads(config_path.read_text())
        if isinstance(config.get("added_tokens_decoder"), dict):
            for token, _, attributes in vocabulary.appended:
                config["added_tokens_decoder"][str(vocabulary.tokens[token])] = {
                    "content": token, **{key: bool(attributes.get(key, False)) for key in (
                        "lstrip", "normalized", "rstrip", "single_word", "special")}}
        _add_listed(config, vocabulary.listed_special, create=True)
        config.update(vocabulary.roles)
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_path = directory / SPECIAL_TOKENS_MAP
    if special_path.exists():
        special = json.loads(special_path.read_text())
        _add_listed(special, vocabulary.listed_special, create=True)
        special.update(vocabulary.roles)
        special_path.write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    added_path = directory / ADDED_TOKENS
    if added_path.exists():
        added = json.loads(added_path.read_text())
        added.update({token: vocabulary.tokens[token] for token, _, _ in vocabulary.appended})
        added_path.write_text(json.dumps(added, indent=2, ensure_ascii=False) + "\n")


def _add_listed(config: dict, tokens: tuple[str, ...], create: bool) -> None:
    if not tokens:
        return
    keys = [key for key in LISTED_SPECIAL if isinstance(config.get(key), list)]
    if not keys and create:
        keys = [LISTED_SPECIAL[0]]
        config[keys[0]] = []
    for key in keys:
        present = {value.get("content") if isinstance(value, dict) else value
                   for value in config[key]}
        config[key] += [token for token in tokens if token not in present]


def write_chat_template(directory: Path, chat_template: ChatTemplate) -> None:
    """The template in one place only, in the base's style: chat_template.jinja, the
    chat_template.json file, or tokenizer_config.json's key (a list of named templates can
    only live there)."""
    (directory / CHAT_TEMPLATE_JINJA).unlink(missing_ok=True)
    (directory / CHAT_TEMPLATE_JSON).unlink(missing_ok=True)
    config_path = directory / TOKENIZER_CONFIG
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config.pop("chat_template", None)
    template = chat_template.template
    if chat_template.style == "config" or not isinstance(template, str):
        config["chat_template"] = template
    elif chat_template.style == "json":
        (directory / CHAT_TEMPLATE_JSON).write_text(
            json.dumps({"chat_template": template}, indent=2, ensure_ascii=False) + "\n")
    else:
        (directory / CHAT_TEMPLATE_JINJA).write_text(template)
    if config_path.exists() or "chat_template" in config:
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
