"""Read a safetensors header without touching tensor data, and refuse malformed ones clearly."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from raymerge.errors import SourceError

# safetensors dtype code -> bytes per element
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}
# dtypes raymerge merges (floating point, read exactly by torch)
MERGEABLE_DTYPES = ("F64", "F32", "F16", "BF16")
# dtypes raymerge copies from the base, unmerged, when every source holds the same values
COPIED_DTYPES = ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL")
_MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: str  # the shard that holds it: an absolute path, or a store's URI
    offset: int = -1  # where its bytes start in the file (-1: not from a header)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor infos of one local safetensors file; SourceError if the header is unreadable or
    lies."""
    from raymerge.store.local import LocalFile

    path = Path(path)
    try:
        file_size = os.path.getsize(path)
        source = LocalFile(str(path))
    except OSError as error:
        raise SourceError(f"{path}: cannot read ({error.strerror}); check permissions") from None
    try:
        return read_header_from(source, file_size, str(path))
    finally:
        source.close()


def read_header_from(source, file_size: int, file: str) -> dict[str, TensorInfo]:
    """Tensor infos of a safetensors file read by range (the 8-byte length, then the header:
    never a weight byte); each TensorInfo names the file as `file`."""
    def read(nbytes: int, offset: int) -> bytes:
        buffer = bytearray(nbytes)
        try:
            source.read_into(memoryview(buffer), offset)
        except OSError as error:
            raise SourceError(f"{file}: cannot read ({error}); check permissions") from None
        return bytes(buffer)

    if file_size < 8:
        raise SourceError(f"{file}: file too short to be safetensors; re-download it")
    (header_size,) = struct.unpack("<Q", read(8, 0))
    if header_size > min(_MAX_HEADER_BYTES, file_size - 8):
        raise SourceError(
            f"{file}: corrupted safetensors header (claims {header_size} bytes in a "
            f"{file_size}-byte file); re-download or re-save this file"
        )
    try:
        header = json.loads(read(header_size, 8))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SourceError(
            f"{file}: corrupted safetensors header (not JSON); re-download or re-save this file"
        ) from None
    if not isinstance(header, dict):
        raise SourceError(f"{file}: corrupted safetensors header (not a mapping); re-save the file")
    data_size = file_size - 8 - header_size
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_info(file, name, entry, data_size, 8 + header_size)
    return tensors


def _tensor_info(path: str, name: str, entry: object, data_size: int,
                 data_start: int) -> TensorInfo:
    try:
        dtype = entry["dtype"]  # type: ignore[index]
        shape = _integers(entry["shape"])  # type: ignore[index]
        start, end = _integers(entry["data_offsets"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise SourceError(
            f"{path}: corrupted safetensors header entry for tensor {name}; re-save the file"
        ) from None
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise SourceError(f"{path}: tensor {name} has unknown dtype {dtype!r}; re-save the file")
    info = TensorInfo(name=name, dtype=dtype, shape=shape, file=str(path),
                      offset=data_start + start)
    if any(dim < 0 for dim in shape) or not 0 <= start <= end <= data_size:
        raise SourceError(
            f"{path}: tensor {name} points past the end of the file (offsets {start}..{end}, "
            f"{data_size} data bytes); the file is truncated or corrupted, re-download it"
        )
    if end - start != info.nbytes:
        raise SourceError(
            f"{path}: tensor {name} has {end - start} bytes for shape {list(shape)} {dtype}; "
            "the file is corrupted, re-save it"
        )
    return info


def _integers(values: object) -> tuple[int, ...]:
    """A JSON list of integers (as safetensors writes shapes and offsets); TypeError for anything
    else: strings, booleans, and floats such as the 1e400 or Infinity a damaged header can hold."""
    if not isinstance(values, list) or not all(
            isinstance(value, int) and not isinstance(value, bool) for value in values):
        raise TypeError("not a list of integers")
    return tuple(values)
