"""Check that every source can be merged with the base, from headers and configs alone."""

from __future__ import annotations

from raymerge.errors import SourceError
from raymerge.sources.checkpoint import Checkpoint
from raymerge.sources.lora import LoraAdapter
from raymerge.sources.safetensors_header import MERGEABLE_DTYPES


def validate_sources(base: Checkpoint, sources: list[Checkpoint | LoraAdapter]) -> None:
    """Raise SourceError naming the first problem: dtype, architecture, vocabulary, tensor set,
    shape. Runs before any tensor data is read."""
    _check_dtypes(base)
    for source in sources:
        if isinstance(source, LoraAdapter):
            _check_lora(base, source)
            continue
        _check_dtypes(source)
        _check_config(base, source)
        _check_tensor_names(base, source)
        _check_shapes(base, source)


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
        for info in (target.up, target.down):
            if info.dtype not in MERGEABLE_DTYPES:
                raise SourceError(f"source {adapter.label}: LoRA factor {info.name} has dtype "
                                  f"{info.dtype}; use an unquantized adapter")


def _check_dtypes(checkpoint: Checkpoint) -> None:
    for name, info in checkpoint.tensors.items():
        if info.dtype not in MERGEABLE_DTYPES:
            raise SourceError(
                f"source {checkpoint.label}: tensor {name} has dtype {info.dtype}, which cannot be "
                f"merged (supported: {', '.join(MERGEABLE_DTYPES)}); use an unquantized checkpoint"
            )


def _check_config(base: Checkpoint, source: Checkpoint) -> None:
    for key in ("model_type", "architectures"):
        if key in base.config and key in source.config and base.config[key] != source.config[key]:
            raise SourceError(
                f"source {source.label}: {key} is {source.config[key]!r} but the base's is "
                f"{base.config[key]!r}; merge only fine-tunes of the same base model"
            )
    base_vocab = _vocab_size(base)
    source_vocab = _vocab_size(source)
    if base_vocab is not None and source_vocab is not None and base_vocab != source_vocab:
        raise SourceError(
            f"source {source.label}: vocabulary size {source_vocab} differs from the base's "
            f"{base_vocab}; resize its embeddings to the base vocabulary or leave it out"
        )


def _vocab_size(checkpoint: Checkpoint) -> int | None:
    config = checkpoint.config
    size = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
    return int(size) if isinstance(size, int) else None


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


def _check_shapes(base: Checkpoint, source: Checkpoint) -> None:
    for name, info in base.tensors.items():
        shape = source.tensors[name].shape
        if shape != info.shape:
            raise SourceError(
                f"source {source.label}: tensor {name} has shape {list(shape)} but the base has "
                f"{list(info.shape)}; merge only fine-tunes of the same base model"
            )
