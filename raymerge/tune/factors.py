"""Read the spectral-factor sidecar an AXIS merge wrote (`spectral_factors/`)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

from ..errors import RaymergeError
from ..output.factors import FACTORS_DIR, FACTORS_INDEX


def load_factors(merged: Path) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """U, σ, V of every matrix whose merged delta is U·diag(σ)·Vᵀ."""
    index_path = merged / FACTORS_DIR / FACTORS_INDEX
    if not index_path.exists():
        raise RaymergeError(
            f"{merged} has no {FACTORS_DIR}/{FACTORS_INDEX}; tuning needs the output of an "
            "`axis` merge (method.name: axis)"
        )
    weight_map = json.loads(index_path.read_text())["weight_map"]
    factors, loaded = {}, {}
    for name, file_name in weight_map.items():
        if file_name not in loaded:
            loaded[file_name] = load_file(merged / FACTORS_DIR / file_name)
        arrays = loaded[file_name]
        factors[name] = (arrays[f"{name}.U"], arrays[f"{name}.S"], arrays[f"{name}.V"])
    return factors
