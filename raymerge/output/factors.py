"""The spectral-factor sidecar: `spectral_factors/` beside the checkpoint's own files (never in
its index), one safetensors file per unit holding U, σ, V of each merged delta, for tuning."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

FACTORS_DIR = "spectral_factors"
FACTORS_INDEX = "index.json"


def unit_file_name(unit_index: int) -> str:
    return f"unit-{unit_index:05d}.safetensors"


class FactorWriter:
    def __init__(self, directory: Path, files: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.files: dict[str, str] = dict(files or {})  # tensor -> file, from a resumed log

    def write(self, unit_index: int, factors: dict[str, dict[str, np.ndarray]]) -> None:
        """One unit's factors, flushed to disk before the unit counts as finished."""
        self.directory.mkdir(exist_ok=True)
        file_name = unit_file_name(unit_index)
        arrays = {f"{name}.{part}": np.ascontiguousarray(array)
                  for name, parts in factors.items() for part, array in parts.items()}
        save_file(arrays, self.directory / file_name, metadata={"format": "raymerge-factors"})
        with open(self.directory / file_name, "rb") as handle:
            os.fsync(handle.fileno())
        self.files.update(dict.fromkeys(factors, file_name))

    def close(self) -> None:
        if self.files:
            index = {"note": "W = W_base + U·diag(S)·Vᵀ; keys are TENSOR.U, TENSOR.S, TENSOR.V",
                     "weight_map": dict(sorted(self.files.items()))}
            (self.directory / FACTORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
