"""Check that every source can be merged with the base, from headers and configs alone."""

from __future__ import annotations

from raymerge.errors import SourceError
from raymerge.sources.checkpoint import Checkpoint
from raymerge.sources.lora import LoraAdapter
from raymerge.sources.safetensors_header import COPIED_DTYPES, MERGEABLE_DTYPES
from raymerge.vocabulary import vocabulary_rows, vocabulary_tensors

CHOOSE_VOCABULARY = ("set tokenizer: {source: union} to keep its new tokens, or tokenizer: "
                     "{source: base} to drop them (tokens are matched by their strings)")


def validate_sources(base: Checkpoint, sources: list[Checkpoint | LoraAdapter],
                     vocabularies_may_differ: bool = False) -> None:
    """Raise SourceError naming the first problem: dtype, architecture, vocabulary, tensor set,
    shape. Runs before any tensor data is read. With `vocabularies_may_differ` (the recipe
    has a `tokenizer` key), vocabulary-indexed tensors may differ along their vocabulary axis."""
    _check_dtypes(base)
    base_rows = vocabulary_rows(base)
    vocabulary_axes = vocabulary_tensors(base, base_rows)
    for source in sources:
        if isinstance(source, LoraAdapter):
            _check_lora(base, source)
            continue
        _check_dtypes(source)
        _check_config(base, source)
        source_rows = vocabulary_rows(source)
        if None not in (source_rows, base_rows) and source_rows != base_rows \
                and not vocabularies_may_differ:
            raise SourceError(
                f"source {source.label}: vocabulary size {source_rows} differs from the base's "
                f"{base_rows}; {CHOOSE_VOCABULARY}")
        _check_tensor_names(base, source)
        _check_shapes(base, source, vocabulary_axes, source_rows)
        _check_dtype_agreement(base, source)


def _check_lora(base: Checkpoint, adapter: LoraAdapter) -> None:
    """Every LoRA target must be a matrix of the base with B: m × r and A: r × n."""
    if not adapter.targets:
        raise SourceError(f"source {adapter.label}: the adapter has no LoRA factors")
    for name, target in adapter.targets.items():
        module = name.removesuffix(".weight")
        if name not in base.tensors:
            raise SourceError(
                f"source {adapter.label}: LoRA target {module} does not exist in the base "
                f"(no tensor {name}); is this adapter for another base model?"
            )
        rows, cols = base.tensors[name].shape if len(base.tensors[name].shape) == 2 else (0, 0)
        rank = target.down.shape[0]
        if target.up.shape != (rows, rank) or target.down.shape != (rank, cols):
            raise SourceError(
                f"source {adapter.label}: LoRA factors of {module} are B {list(target.up.shape)}"
                f" and A {list(target.down.shape)}, which do not multiply to the base's "
                f"{list(base.tensors[name].shape)}; is this adapter for another base model?"
            )
        if base.tensors[name].dtype not in MERGEABLE_DTYPES:
            raise SourceError(f"source {adapter.label}: LoRA target {module} is the base's "
                              f"{base.tensors[name].dtype} tensor, which is not merged; is this "
                              "adapter for another base model?")
        for info in (target.up, target.down):
            if info.dtype not in MERGEABLE_DTYPES:
                raise SourceError(f"source {adapter.label}: LoRA factor {info.name} has dtype "
                                  f"{info.dtype}; use an unquantized adapter")


def _check_dtypes(checkpoint: Checkpoint) -> None:
    """Floating-point tensors are merged, integer and boolean ones copied; float8 and other
    formats torch cannot merge exactly are refused."""
    for name, info in checkpoint.tensors.items():
        if info.dtype not in MERGEABLE_DTYPES and info.dtype not in COPIED_DTYPES:
            raise SourceError(
                f"source {checkpoint.label}: tensor {name} has dtype {info.dtype}, which cannot be "
                f"merged (supported: {', '.join(MERGEABLE_DTYPES)}); use an unquantized checkpoint"
            )


def _check_dtype_agreement(base: Checkpoint, source: Checkpoint) -> None:
    """A floating-point tensor may change precision (it is converted), an integer or boolean
    one must keep the base's dtype: it is copied from the base, not merged."""
    for name, info in base.tensors.items():
        dtype = source.tensors[name].dtype
        if dtype == info.dtype or (dtype in MERGEABLE_DTYPES and info.dtype in MERGEABLE_DTYPES):
            continue
        fix = ("use an unquantized checkpoint" if info.dtype in MERGEABLE_DTYPES else
               "integer and boolean tensors are copied from the base, not merged: use a "
               "fine-tune that keeps the base's")
        raise SourceError(f"source {source.label}: tensor {name} has dtype {dtype} but the base "
                          f"has {info.dtype}; {fix}")


def _check_config(base: Checkpoint, source: Checkpoint) -> None:
    for key in ("model_type", "architectures"):
        if key in base.config and key in source.config and base.config[key] != source.config[key]:
            raise SourceError(
                f"source {source.label}: {key} is {source.config[key]!r} but the base's is "
                f"{base.config[key]!r}; merge only fine-tunes of the same base model"
            )


def _check_tensor_names(base: Checkpoint, source: Checkpoint) -> None:
    missing = sorted(set(base.tensors) - set(source.tensors))
    if missing:
        raise SourceError(
            f"source {source.label}: tensor {missing[0]} of the base is missing{_more(missing)}; "
            "is it a complete checkpoint of the same architecture?"
        )
    extra = sorted(set(source.tensors) - set(base.tensors))
    if extra:
        raise SourceError(
            f"source {source.label}: tensor {extra[0]} is not in the base{_more(extra)}; "
            "is it a fine-tune of this base (or an adapter/head that should be removed)?"
        )


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _check_shapes(base: Checkpoint, source: Checkpoint, vocabulary_axes: dict[str, int],
                  source_rows: int | None) -> None:
    """Equal shapes, but for a vocabulary-indexed tensor's vocabulary axis, which has the
    source's own vocabulary rows."""
    for name, info in base.tensors.items():
        shape = source.tensors[name].shape
        axis = vocabulary_axes.get(name)
        if axis is not None and len(shape) == len(info.shape) and shape[axis] == source_rows:
            shape = shape[:axis] + (info.shape[axis],) + shape[axis + 1:]
        if shape != info.shape:
            raise SourceError(
                f"source {source.label}: tensor {name} has shape {list(source.tensors[name].shape)}"
                f" but the base has {list(info.shape)}; merge only fine-tunes of the same base "
                "model"
            )
