"""Small tensors (LoRA factors, integer tensors) read whole from wherever their file is: a local
path or a store's URI, by one range read of exactly their bytes."""

from __future__ import annotations

import numpy as np
import torch

from raymerge.sources.safetensors_header import TensorInfo
from raymerge.store import open_bytes
from raymerge.store.settings import StorageSettings
from raymerge.tensor_bits import TORCH_DTYPES

NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
                "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


def read_bytes(info: TensorInfo, storage: StorageSettings | None) -> bytearray:
    buffer = bytearray(info.nbytes)
    source = open_bytes(info.file, storage)
    try:
        if info.nbytes:
            source.read_into(memoryview(buffer), info.offset)
    finally:
        source.close()
    return buffer


def read_small_tensor(info: TensorInfo, storage: StorageSettings | None) -> torch.Tensor:
    """The tensor in its file's dtype, on the CPU."""
    raw = torch.frombuffer(read_bytes(info, storage), dtype=torch.uint8) if info.nbytes \
        else torch.empty(0, dtype=torch.uint8)
    return raw.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)


def read_numpy_tensor(info: TensorInfo, storage: StorageSettings | None) -> np.ndarray:
    """An integer or boolean tensor (or a float one numpy has) as numpy."""
    return np.frombuffer(read_bytes(info, storage), dtype=NUMPY_DTYPES[info.dtype]).reshape(
        info.shape)


class Rows:
    """A tensor's rows (slices of its first dimension) by range reads, in its file's dtype."""

    def __init__(self, info: TensorInfo, storage: StorageSettings | None) -> None:
        self.info = info
        self.row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
        self.source = open_bytes(info.file, storage)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.info.shape[0])
        count = max(0, stop - start)
        buffer = bytearray(count * self.row_bytes)
        if buffer:
            self.source.read_into(memoryview(buffer), self.info.offset + start * self.row_bytes)
            raw = torch.frombuffer(buffer, dtype=torch.uint8)
        else:
            raw = torch.empty(0, dtype=torch.uint8)
        return raw.view(TORCH_DTYPES[self.info.dtype]).reshape(count, *self.info.shape[1:])

    def __enter__(self) -> Rows:
        return self

    def __exit__(self, *exc_info) -> None:
        self.source.close()
