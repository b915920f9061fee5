"""dtype names across torch, safetensors and the recipe, and how bfloat16 crosses numpy."""

from __future__ import annotations

import numpy as np
import torch

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16}
RECIPE_TO_CODE = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
CODE_TO_RECIPE = {code: name for name, code in RECIPE_TO_CODE.items()}
ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def to_numpy_bits(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array with the tensor's exact bytes; numpy has no bfloat16, so it travels as a
    uint16 view (zero-copy through Ray's object store either way)."""
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.uint16)
    return tensor.numpy()


def from_numpy_bits(array: np.ndarray, code: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if code == "BF16" else tensor
