"""The output vocabulary of a merge, decided before any tensor data is read: from the recipe's
`tokenizer` key, the checkpoints' headers and their tokenizer files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from raymerge.errors import SourceError
from raymerge.sources.checkpoint import Checkpoint
from raymerge.sources.lora import LoraAdapter
from raymerge.sources.tokenizer_files import (
    ChatTemplate,
    has_vocabulary,
    read_chat_template,
    read_token_table,
    tokenizer_paths,
    vocabulary_digest,
)
from raymerge.sources.validate import CHOOSE_VOCABULARY
from raymerge.vocabulary import (
    OutputVocabulary,
    TokenTable,
    build_output_vocabulary,
    vocabulary_rows,
    vocabulary_tensors,
)


def output_vocabulary(base: Checkpoint, sources: list[Checkpoint | LoraAdapter],
                      source: str | None, pad_to_multiple_of: int | None = None
                      ) -> OutputVocabulary | None:
    """The output vocabulary for tokenizer.source = `source` ("base", "union", or a source's
    label; the base's label means "base"), or None without a tokenizer key, after checking
    that every vocabulary is then the base's (else a SourceError naming both choices)."""
    reader = _Tables(base)
    for adapter in (s for s in sources if isinstance(s, LoraAdapter)):
        _refuse_adapter_with_tokens(reader, adapter)
    if source is None:
        _refuse_differing_vocabularies(reader, sources)
        return None
    base_rows = vocabulary_rows(base)
    if base_rows is None:
        raise SourceError(f"tokenizer: the base {base.label} has no vocabulary-indexed tensor "
                          "(embeddings or head) to re-index; remove the tokenizer key")
    if not has_vocabulary(base.directory):
        raise SourceError(f"source {base.label}: no tokenizer files, but the tokenizer key "
                          "matches tokens by their strings; add the base's tokenizer files")
    tables: list[TokenTable | None] = []
    rows: list[int | None] = []
    for checkpoint in sources:
        if isinstance(checkpoint, LoraAdapter):
            tables.append(None)
            rows.append(None)
            continue
        source_rows = vocabulary_rows(checkpoint)
        if has_vocabulary(checkpoint.directory):
            tables.append(reader.table(checkpoint))
        elif source_rows == base_rows:  # no tokenizer of its own: the base's vocabulary
            tables.append(reader.base_table)
        else:
            raise SourceError(
                f"source {checkpoint.label}: no tokenizer files, and its vocabulary has "
                f"{source_rows} rows where the base has {base_rows}; add the tokenizer it was "
                "trained with")
        rows.append(source_rows)
    choice = "base" if source in ("base", base.label) else source
    return build_output_vocabulary(
        choice, reader.base_table, base_rows, tables, rows,
        labels=[checkpoint.label for checkpoint in sources],
        axes=vocabulary_tensors(base, base_rows), pad_to_multiple_of=pad_to_multiple_of,
        base_label=base.label)


class _Tables:
    """Token tables, read once each; a tokenizer whose vocabulary files are the base's bytes is
    the base's table without reading it again."""

    def __init__(self, base: Checkpoint) -> None:
        self.base = base
        self._base_table: TokenTable | None = None
        self._base_digest: str | None = None

    @property
    def base_table(self) -> TokenTable:
        if self._base_table is None:
            self._base_table = read_token_table(self.base.label, self.base.directory)
        return self._base_table

    def same_as_base(self, checkpoint: Checkpoint | LoraAdapter) -> bool:
        if self._base_digest is None:
            self._base_digest = vocabulary_digest(self.base.directory)
        return vocabulary_digest(checkpoint.directory) == self._base_digest

    def table(self, checkpoint: Checkpoint | LoraAdapter) -> TokenTable:
        if self.same_as_base(checkpoint):
            return self.base_table
        return read_token_table(checkpoint.label, checkpoint.directory)


def _refuse_differing_vocabularies(reader: _Tables, sources: list) -> None:
    """Without a tokenizer key every source with a tokenizer must have the base's tokens at the
    base's ids (equal embedding sizes were checked from the headers)."""
    if not has_vocabulary(reader.base.directory):
        return
    for checkpoint in sources:
        if isinstance(checkpoint, LoraAdapter) or not has_vocabulary(checkpoint.directory):
            continue
        if reader.same_as_base(checkpoint):
            continue
        table = reader.table(checkpoint)
        if table.tokens != reader.base_table.tokens:
            raise SourceError(f"source {checkpoint.label}: its tokenizer differs from the "
                              f"base's ({_difference(table, reader.base_table)}); "
                              f"{CHOOSE_VOCABULARY}")


def _refuse_adapter_with_tokens(reader: _Tables, adapter: LoraAdapter) -> None:
    """A LoRA adapter saved with a tokenizer that has tokens the base lacks added them: its
    embedding rows for them are not in the adapter (refused, not guessed)."""
    if not has_vocabulary(adapter.directory) or not has_vocabulary(reader.base.directory) \
            or reader.same_as_base(adapter):
        return
    table = read_token_table(adapter.label, adapter.directory)
    new = [token for token, _ in sorted(table.tokens.items(), key=lambda item: item[1])
           if token not in reader.base_table.tokens]
    if new:
        raise SourceError(
            f"source {adapter.label}: the adapter's tokenizer adds {len(new)} tokens to the "
            f"base's (e.g. {new[0]!r}), whose embeddings a LoRA adapter does not hold; merge it "
            "into its base with peft's merge_and_unload and use that model")


def _difference(table: TokenTable, base: TokenTable) -> str:
    new = [token for token, _ in sorted(table.tokens.items(), key=lambda item: item[1])
           if token not in base.tokens]
    if new:
        return f"{len(new)} tokens the base lacks, e.g. {new[0]!r}"
    moved = sorted(token for token, index in table.tokens.items()
                   if base.tokens.get(token, index) != index)
    if moved:
        return f"{len(moved)} tokens at other ids, e.g. {moved[0]!r}"
    missing = sorted(token for token in base.tokens if token not in table.tokens)
    return f"it lacks {len(missing)} of the base's tokens, e.g. {missing[0]!r}"


def vocabulary_directory(base: Checkpoint, sources: list, vocabulary: OutputVocabulary | None
                         ) -> Path:
    """Whose tokenizer files the output takes: the named source's for tokenizer.source: PATH
    (the base's where that source has none of its own), else the base's."""
    if vocabulary is not None and vocabulary.source not in ("base", "union"):
        chosen = next(s for s in sources if s.label == vocabulary.source)
        if has_vocabulary(chosen.directory):
            return chosen.directory
    return base.directory


def choose_chat_template(choice: str | None, base: Checkpoint, sources: list,
                         tokenizer_directory: Path) -> ChatTemplate | None:
    """The recipe's chat_template: "base", a source's path (its template), "auto" (the template
    most of the checkpoints carry, ties to the earliest, base first: mergekit's auto), or a
    Jinja template; stored as the base stores its own (chat_template.jinja where it has none)."""
    if choice is None:
        return None
    if not tokenizer_paths(tokenizer_directory):
        raise SourceError(f"chat_template: the output has no tokenizer to hold it ({base.label} "
                          "has no tokenizer files); remove chat_template or add the tokenizer")
    base_template, base_style = read_chat_template(base.label, base.directory)
    labels = [source.label for source in sources]
    if choice == "auto":  # mergekit's auto: the template most checkpoints carry
        found = [read_chat_template(c.label, c.directory)[0] for c in [base, *sources]
                 if isinstance(c, Checkpoint)]
        found = [template.strip() for template in found if template]
        if not found:
            return None  # as mergekit: the output keeps the tokenizer's own (none)
        chosen = Counter(found).most_common(1)[0][0]  # ties: the earliest, base first
        return ChatTemplate(template=chosen, style=base_style or "jinja", origin="auto")
    if choice in ("base", base.label):
        template, style, origin, owner = base_template, base_style, "base", base
    elif choice in labels:
        owner = sources[labels.index(choice)]
        template, style = read_chat_template(owner.label, owner.directory)
        origin = choice
    else:
        return ChatTemplate(template=choice, style=base_style or "jinja", origin="recipe")
    if template is None:
        raise SourceError(
            f"chat_template: {owner.label} has no chat template (no chat_template.jinja, "
            "chat_template.json or tokenizer_config.json chat_template); choose another "
            "checkpoint's, or write the template itself")
    return ChatTemplate(template=template, style=base_style or style or "jinja", origin=origin)
