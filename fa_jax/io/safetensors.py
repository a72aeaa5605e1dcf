"""A small, streaming safetensors reader and writer.

Reading validates the header against the file size first, so a truncated or corrupt
file is one clear error before anything is loaded. Writing streams tensor by tensor: the header is computed from
shapes and dtypes, then each tensor is fetched, converted and written, so host memory holds one tensor at a time.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from fa_jax.errors import FaJaxError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Header-validated view of one .safetensors file; tensors are read on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise FaJaxError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, 100 << 20):
                    raise FaJaxError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes, "
                                     f"file of {size} bytes)")
                header = json.loads(f.read(n))
        except OSError as e:
            raise FaJaxError(f"{path}: cannot read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FaJaxError(f"{path}: corrupt safetensors header (not valid JSON)") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        data_len = size - self._start
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise FaJaxError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise FaJaxError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} "
                                 f"of {info['dtype']}")
            if end > data_len:
                raise FaJaxError(f"{path}: truncated file: tensor {name!r} needs bytes up to {end} of the data "
                                 f"section but the file holds only {data_len}")
            self.tensors[name] = (dtype, shape, begin, end)

    def keys(self):
        return self.tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.tensors[name][0]

    def get(self, name: str) -> np.ndarray:
        """The tensor, read into a fresh array (read, not memory-mapped: mapped pages of a large file would
        stay resident beside the converted copies and double the host footprint of a load)."""
        dtype, shape, begin, end = self.tensors[name]
        arr = np.fromfile(self.path, dtype=np.uint8, count=end - begin, offset=self._start + begin)
        return arr.view(dtype).reshape(shape)


    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor (its first axis), reading only their bytes."""
        dtype, shape, begin, _ = self.tensors[name]
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        stop = min(stop, shape[0])
        arr = np.fromfile(self.path, dtype=np.uint8, count=(stop - start) * row,
                          offset=self._start + begin + start * row)
        return arr.view(dtype).reshape((stop - start,) + tuple(shape[1:]))


def dtype_name(dtype) -> str:
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise FaJaxError(f"dtype {dtype} cannot be stored in safetensors") from None


def write(path: str, entries: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
          metadata: dict | None = None) -> None:
    """Write tensors given as (name, shape, dtype, fetch) where `fetch()` returns the array when it is written, or
    an iterator of consecutive row blocks of it (so a large tensor never needs to be in memory whole)."""
    entries = list(entries)
    header, offset = {}, 0
    for name, shape, dtype, _ in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, fetch in entries:
            got = fetch()
            blocks = [got] if hasattr(got, "shape") else got
            rows = 0
            for block in blocks:
                arr = np.ascontiguousarray(np.asarray(block), dtype=dtype)
                if arr.shape[1:] != tuple(shape[1:]) or (not shape and arr.shape != ()):
                    raise FaJaxError(f"{path}: tensor {name!r} has shape {arr.shape}, header says {tuple(shape)}")
                rows += arr.shape[0] if shape else 1
                f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            if rows != (shape[0] if shape else 1):
                raise FaJaxError(f"{path}: tensor {name!r} got {rows} rows, header says {tuple(shape)}")
