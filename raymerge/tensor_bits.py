"""torch dtypes for safetensors codes, and how a tensor's exact bytes cross numpy."""

from __future__ import annotations

import numpy as np
import torch

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16}


def to_numpy_bits(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array with the tensor's exact bytes; numpy has no bfloat16, so it travels as a
    uint16 view (zero-copy through Ray's object store either way)."""
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.uint16)
    return tensor.numpy()
