"""Minimal safetensors reader/writer on numpy memory maps.

Own code rather than ``safetensors.numpy`` because that backend has no bfloat16, and
most real checkpoints are bf16. Reading is lazy (one tensor at a time from an mmap), so
a model never has to fit in host memory twice. Errors name the file and the tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxtune.errors import ModelLoadError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """Returns (header dict without ``__metadata__``, byte offset of the data section)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelLoadError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise ModelLoadError(
                f"{path}: corrupt safetensors header (length {n}, file {size} bytes)"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if data_start + end > size:
            raise ModelLoadError(
                f"{path}: truncated: tensor {name!r} needs bytes up to {data_start + end}, "
                f"file has {size}"
            )
        if info["dtype"] not in DTYPES:
            raise ModelLoadError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    return header, data_start


def iter_tensors(path: Path, names: list[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array view on an mmap) for each tensor in file order (or ``names``)."""
    header, start = read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    order = (
        names if names is not None else sorted(header, key=lambda k: header[k]["data_offsets"][0])
    )
    for name in order:
        info = header[name]
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        arr = mm[start + begin : start + end].view(dtype).reshape(info["shape"])
        yield name, arr


def write_file(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Writes one safetensors file (tensors stored in the given order)."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        nbytes = arr.nbytes
        header[name] = {
            "dtype": NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)  # keep tensors 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes(order="C"))
