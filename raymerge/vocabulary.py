"""Vocabularies that differ between the base and the sources.

Tokens are matched by their strings, never by row number. This module decides, from the
checkpoints' headers and their tokenizers' token tables (read elsewhere), which tensors are
indexed by token id and along which axis, what the output vocabulary is (`base`, `union`, or
one source's), and for every checkpoint which of its rows fill which output rows. Plain data:
no file I/O, no torch; the tasks apply it (raymerge.execute) while streaming.

Per output row j of a vocabulary-indexed tensor:
- a token the base has: the base's row; each source's delta is its own row of that token minus
  it, or zero where the source lacks the token;
- a token the base lacks: the base's row is synthesized as the mean of the rows of the sources
  that have it (one extra pass over those rows), then merged the same way;
- padding (a row that is no token, embeddings rounded up to a multiple): the base's own padding
  row where it has one there, else the mean of the base's token rows; every delta is zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raymerge.errors import SourceError
from raymerge.roles import is_vocabulary_role, natural_key

if TYPE_CHECKING:
    from raymerge.sources.checkpoint import Checkpoint

# (first output row, first checkpoint row, count): a block of consecutive rows
Runs = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class TokenTable:
    """A tokenizer's tokens: string -> id, and the attributes of its added tokens (special,
    normalized, lstrip, rstrip, single_word), its special-token roles (pad_token -> '<pad>')
    and the tokens it lists as additional special tokens."""

    tokens: dict[str, int]
    added: dict[str, dict[str, bool]] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    listed_special: tuple[str, ...] = ()

    def by_id(self) -> dict[int, str]:
        """id -> token; where two strings share an id, the first in sorted order."""
        table: dict[int, str] = {}
        for token, index in sorted(self.tokens.items(), key=lambda item: (item[1], item[0])):
            table.setdefault(index, token)
        return table


@dataclass(frozen=True)
class Reindexing:
    """What a task needs to re-index the vocabulary-indexed tensors into the output vocabulary
    (small: runs of rows, not one index per row)."""

    rows: int  # rows of the output's vocabulary-indexed tensors: tokens and padding
    axes: dict[str, int]  # tensor name -> its vocabulary axis
    base_tokens: Runs  # output rows of the tokens the base has <- the base's rows
    base_padding: Runs  # output padding rows <- the base's own padding rows
    mean_padding: tuple[int, ...]  # output padding rows set to the mean of the base's token rows
    # output row of a token the base lacks -> ((source index, source row), ...) that have it
    new_tokens: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]
    sources: tuple[Runs | None, ...]  # per source: output rows <- its rows (None: a LoRA source)

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A tensor's output shape: `rows` along its vocabulary axis."""
        if name not in self.axes:
            return shape
        axis = self.axes[name]
        return shape[:axis] + (self.rows,) + shape[axis + 1:]


@dataclass(frozen=True)
class OutputVocabulary:
    """The chosen vocabulary and how every checkpoint maps onto it."""

    source: str  # "base", "union", or the recipe's path of the source whose tokenizer it is
    tokens: dict[str, int]  # the output's token -> row
    rows: int
    # tokens appended to the base's tokenizer (union), in order, with the label of the source
    # that contributed each and that source's attributes of it
    appended: tuple[tuple[str, str, dict[str, bool]], ...]
    dropped: dict[str, int]  # source label -> how many of its tokens the output lacks
    reindexing: Reindexing | None  # None: every checkpoint already has the output's rows
    roles: dict[str, str] = field(default_factory=dict)  # roles the output's tokenizer gains
    listed_special: tuple[str, ...] = ()  # appended tokens a source lists as special
    moved_ids: dict[int, int] = field(default_factory=dict)  # base id -> output id, where moved

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "tokens": len(self.tokens),
            "rows": self.rows,
            "added_tokens": [token for token, _, _ in self.appended],
            "dropped_tokens": {label: count for label, count in self.dropped.items() if count},
        }


def vocabulary_rows(checkpoint: Checkpoint) -> int | None:
    """How many rows the checkpoint's vocabulary-indexed tensors have (tokens and padding):
    config.json's vocab_size (or text_config's) where some such tensor has a dimension of that
    size, else the first such tensor's first dimension; None without any."""
    candidates = [name for name in sorted(checkpoint.tensors, key=natural_key)
                  if is_vocabulary_role(name) and checkpoint.tensors[name].shape]
    if not candidates:
        return None
    configured = configured_vocab_size(checkpoint.config)
    if configured is not None and any(configured in checkpoint.tensors[name].shape
                                      for name in candidates):
        return configured
    return checkpoint.tensors[candidates[0]].shape[0]


def configured_vocab_size(config: dict[str, Any]) -> int | None:
    size = config.get("vocab_size")
    if not isinstance(size, int):
        text_config = config.get("text_config")
        size = text_config.get("vocab_size") if isinstance(text_config, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def vocabulary_tensors(checkpoint: Checkpoint, rows: int | None = None) -> dict[str, int]:
    """Tensor name -> vocabulary axis: tensors whose role is vocabulary-indexed (roles.py)
    along the first dimension whose size is the checkpoint's vocabulary rows."""
    rows = vocabulary_rows(checkpoint) if rows is None else rows
    if rows is None:
        return {}
    axes = {}
    for name, info in checkpoint.tensors.items():
        if is_vocabulary_role(name) and rows in info.shape:
            axes[name] = info.shape.index(rows)
    return axes


def build_output_vocabulary(
    choice: str,
    base: TokenTable,
    base_rows: int,
    sources: Sequence[TokenTable | None],
    source_rows: Sequence[int | None],
    labels: Sequence[str],
    axes: dict[str, int],
    pad_to_multiple_of: int | None = None,
    base_label: str = "base",
) -> OutputVocabulary:
    """The output vocabulary for tokenizer.source = `choice` ("base", "union" or one of
    `labels`), and the re-indexing of every checkpoint onto it. A source whose table is None
    is a LoRA adapter: it has the base's vocabulary and rows.

    Output rows without `pad_to_multiple_of`: the rows of the checkpoint whose tokenizer the
    output takes (the base for base and union), or the number of tokens where more tokens
    than that are needed (then unpadded, as transformers' resize_token_embeddings does); with
    it, the number of tokens rounded up to that multiple."""
    check_fits_rows(base_label, base, base_rows)
    for label, table, count in zip(labels, sources, source_rows):
        if table is not None:
            check_fits_rows(label, table, count)
    if choice == "base":
        tokens, appended, reference_rows = dict(base.tokens), (), base_rows
    elif choice == "union":
        tokens, appended = _union(base, sources, labels)
        reference_rows = base_rows
    else:
        index = list(labels).index(choice)
        table = sources[index]
        if table is None:
            raise SourceError(f"tokenizer.source {choice} is a LoRA adapter, which has the "
                              "base's vocabulary; use tokenizer.source: base")
        tokens, appended, reference_rows = dict(table.tokens), (), source_rows[index]
    used = max(tokens.values()) + 1
    if pad_to_multiple_of:
        rows = -(-used // pad_to_multiple_of) * pad_to_multiple_of
    else:
        rows = max(reference_rows, used)
    dropped = {label: sum(token not in tokens for token in table.tokens)
               for label, table in zip(labels, sources) if table is not None}
    reindexing = _reindexing(tokens, rows, base, base_rows, sources, source_rows, axes)
    roles = _gained_roles(base, sources, tokens) if choice == "union" else {}
    listed = {token for table in sources if table is not None for token in table.listed_special}
    moved = {index: tokens[token] for index, token in base.by_id().items()
             if token in tokens and tokens[token] != index}
    return OutputVocabulary(source=choice, tokens=tokens, rows=rows, appended=appended,
                            dropped=dropped, reindexing=reindexing, roles=roles,
                            listed_special=tuple(t for t, _, _ in appended if t in listed),
                            moved_ids=moved)


def check_fits_rows(label: str, table: TokenTable, rows: int | None) -> None:
    """SourceError where a tokenizer has a token past the checkpoint's embedding rows."""
    token, index = max(table.tokens.items(), key=lambda item: (item[1], item[0]))
    if rows is not None and index >= rows:
        raise SourceError(
            f"source {label}: its tokenizer has token {token!r} at id {index} but its "
            f"vocabulary-indexed tensors have {rows} rows; resize its embeddings to its "
            "tokenizer (or fix the tokenizer)")


def _union(base: TokenTable, sources: Sequence[TokenTable | None], labels: Sequence[str]
           ) -> tuple[dict[str, int], tuple[tuple[str, str, dict[str, bool]], ...]]:
    """The base's tokens at their ids, then each source's tokens the base lacks, in source
    order and, within a source, in the order of its ids."""
    tokens = dict(base.tokens)
    next_id = max(tokens.values()) + 1
    appended = []
    for label, table in zip(labels, sources):
        if table is None:
            continue
        for _, token in sorted(table.by_id().items()):
            if token not in tokens:
                tokens[token] = next_id
                next_id += 1
                attributes = table.added.get(token, {"special": False, "normalized": True})
                appended.append((token, label, attributes))
    return tokens, tuple(appended)


def _gained_roles(base: TokenTable, sources: Sequence[TokenTable | None], tokens: dict[str, int]
                  ) -> dict[str, str]:
    """Special-token roles the base's tokenizer lacks (a pad token, say), from the first source
    that has one whose token is in the output."""
    gained: dict[str, str] = {}
    for table in sources:
        for role, token in (table.roles if table else {}).items():
            if role not in base.roles and role not in gained and token in tokens:
                gained[role] = token
    return gained


def _reindexing(tokens: dict[str, int], rows: int, base: TokenTable, base_rows: int,
                sources: Sequence[TokenTable | None], source_rows: Sequence[int | None],
                axes: dict[str, int]) -> Reindexing | None:
    """None where the vocabularies are all the same (same tokens at the same ids, same rows):
    then every row, padding included, is merged as any other row, as without the key."""
    tables = [table for table in sources if table is not None]
    if (tokens == base.tokens and rows == base_rows
            and all(table.tokens == base.tokens for table in tables)
            and all(count == rows for count, table in zip(source_rows, sources) if table)):
        return None
    output_by_id = {index: token for token, index in tokens.items()}
    base_by_id = base.by_id()
    base_pairs, base_padding, mean_padding, new_rows = [], [], [], []
    for row in range(rows):
        token = output_by_id.get(row)
        if token is None:  # padding: the base's own padding row there, else the mean
            if row < base_rows and row not in base_by_id:
                base_padding.append((row, row))
            else:
                mean_padding.append(row)
        elif token in base.tokens:
            base_pairs.append((row, base.tokens[token]))
        else:
            holders = tuple((index, table.tokens[token]) for index, table in enumerate(sources)
                            if table is not None and token in table.tokens)
            new_rows.append((row, holders))
    source_runs: list[Runs | None] = []
    for table in sources:
        if table is None:
            source_runs.append(None)
            continue
        pairs = sorted((row, table.tokens[token]) for token, row in tokens.items()
                       if token in table.tokens)
        source_runs.append(runs_of(pairs))
    return Reindexing(rows=rows, axes=dict(axes), base_tokens=runs_of(base_pairs),
                      base_padding=runs_of(base_padding), mean_padding=tuple(mean_padding),
                      new_tokens=tuple(new_rows), sources=tuple(source_runs))


def runs_of(pairs: Sequence[tuple[int, int]]) -> Runs:
    """(output row, checkpoint row) pairs, sorted by output row, as runs of consecutive rows."""
    runs: list[list[int]] = []
    for out, src in pairs:
        if runs and runs[-1][0] + runs[-1][2] == out and runs[-1][1] + runs[-1][2] == src:
            runs[-1][2] += 1
        else:
            runs.append([out, src, 1])
    return tuple(tuple(run) for run in runs)  # type: ignore[misc]
