"""PEFT LoRA adapters as sources: Δ = s·B·A for each target matrix (s = lora_alpha / r, or
lora_alpha / √r with rsLoRA), zero elsewhere. The factors are read, never an m×n product, unless
a method can only work on dense deltas."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raymerge.errors import SourceError
from raymerge.sources.safetensors_header import TensorInfo, read_header
from raymerge.sources.tensor_bytes import read_small_tensor
from raymerge.store.base import FileFacts
from raymerge.store.settings import StorageSettings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# base_model.model.<module>.lora_A[.<adapter name>].weight -> <module>.weight
_LORA_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
_EMBEDDING_LORA_KEY = re.compile(r"^base_model\.model\..+\.lora_embedding_[AB](?:\.[^.]+)?$")


@dataclass(frozen=True)
class LoraTarget:
    down: TensorInfo  # A: r × n
    up: TensorInfo  # B: m × r
    scale: float


@dataclass
class LoraAdapter:
    label: str
    directory: Path
    targets: dict[str, LoraTarget]  # base tensor name -> factors
    config: dict[str, Any] = field(default_factory=dict)
    revision: str | None = None
    facts: dict[str, FileFacts] = field(default_factory=dict)  # in a store: as Checkpoint's
    storage: StorageSettings | None = None

    @property
    def remote(self) -> bool:
        return bool(self.facts)

    @property
    def files(self) -> list[str]:
        return sorted({target.up.file for target in self.targets.values()}) or \
            [str(self.directory / ADAPTER_WEIGHTS)]

    def nbytes_of(self, name: str) -> int:
        target = self.targets.get(name)
        return 0 if target is None else target.down.nbytes + target.up.nbytes

    def factors(self, name: str, dtype: torch.dtype, device: str
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(left, right) with Δ = left·rightᵀ: left = s·B (m × r), right = Aᵀ (n × r); None
        where the adapter does not touch this tensor (Δ = 0)."""
        target = self.targets.get(name)
        if target is None:
            return None
        up, down = read_small_tensor(target.up, self.storage), \
            read_small_tensor(target.down, self.storage)
        left = up.to(device=device, dtype=dtype).mul_(target.scale)
        right = down.to(device=device, dtype=dtype).mT
        if not (torch.isfinite(left.sum()) and torch.isfinite(right.sum())):
            raise SourceError(
                f"source {self.label}: LoRA factors of {name} contain NaN or Inf; "
                "this adapter diverged or is corrupted, leave it out or re-save it"
            )
        return left, right


def is_lora_directory(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).exists()


def open_lora(label: str, directory: Path, revision: str | None = None,
              header: dict[str, TensorInfo] | None = None) -> LoraAdapter:
    """The adapter in `directory`; `header`: its weights' tensor table where the weights are in
    a store (read by range), not in the directory."""
    directory = directory.resolve()
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError:
        raise SourceError(f"source {label}: {ADAPTER_CONFIG} is not valid JSON; re-save the "
                          "adapter") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise SourceError(f"source {label}: PEFT type {config.get('peft_type')} is not LoRA; "
                          "only LoRA adapters can be merged")
    # modules_to_save and trainable_token_indices train embeddings or heads whole, or the
    # rows of added tokens: refused, as every other adapter feature raymerge does not merge.
    unsupported = [key for key in ("rank_pattern", "alpha_pattern", "modules_to_save",
                                   "trainable_token_indices") if config.get(key)]
    if config.get("fan_in_fan_out"):
        unsupported.append("fan_in_fan_out")
    if unsupported:
        raise SourceError(
            f"source {label}: adapter uses {', '.join(unsupported)}, which raymerge does not "
            "merge; merge it into the base with peft's merge_and_unload and use that model "
            "(with a tokenizer key where it added tokens)"
        )
    if header is None:
        weights = directory / ADAPTER_WEIGHTS
        if not weights.exists():
            raise SourceError(f"source {label}: no {ADAPTER_WEIGHTS} in {directory}; save the "
                              "adapter with safetensors")
        try:
            header = read_header(weights)
        except SourceError as error:
            raise SourceError(f"source {label}: {error}") from None
    return LoraAdapter(label=label, directory=directory, config=config, revision=revision,
                       targets=_pair_factors(label, header, config))


def _pair_factors(label: str, header: dict[str, TensorInfo], config: dict
                  ) -> dict[str, LoraTarget]:
    parts: dict[str, dict[str, TensorInfo]] = {}
    for key, info in header.items():
        match = _LORA_KEY.match(key)
        if match is None and _EMBEDDING_LORA_KEY.match(key):
            raise SourceError(
                f"source {label}: adapter tensor {key} is a LoRA factor of an embedding layer, "
                "which raymerge does not merge; merge it into the base with peft's "
                "merge_and_unload and use that model")
        if match is None:
            raise SourceError(
                f"source {label}: adapter tensor {key} is not a LoRA A/B factor of a linear "
                "layer; raymerge merges LoRA on linear layers only"
            )
        parts.setdefault(f"{match['module']}.weight", {})[match["part"]] = info
    alpha = float(config.get("lora_alpha", config.get("r", 8)))
    targets = {}
    for name, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            raise SourceError(f"source {label}: LoRA factor {'A' if 'A' not in pair else 'B'} "
                              f"of {name} is missing; re-save the adapter")
        rank = pair["A"].shape[0]
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        targets[name] = LoraTarget(down=pair["A"], up=pair["B"], scale=scale)
    return targets
