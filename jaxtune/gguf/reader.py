"""A small, strict GGUF reader: header, metadata and tensor infos, without the vocabulary.

``gguf.GGUFReader`` turns every metadata value into numpy arrays up front, including each
of the ~100k vocabulary and merge strings of a tokenizer: ~250 MiB and ~4 s for a 135M
model. Loading weights needs none of that, so this reader parses the header with
``struct``, keeps scalars, strings and small numeric arrays, and records where large
arrays are so they are decoded only when asked for (the tokenizer). Tensor bytes are
slices of one read-only ``np.memmap``::

    f = GGUFFile("model.gguf")
    f.get("llama.block_count")            # 30
    f.get("tokenizer.ggml.tokens")        # decoded now: a list of 49152 str
    t = f.tensors[0]                      # name, shape (fastest-first), tensor_type, ...
    t.data                                # uint8 [rows..., row_bytes] memmap slice

Layout (little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
``"GGUF" u32 version, u64 n_tensors, u64 n_kv``; ``n_kv`` x ``(string key, u32 type,
value)``; ``n_tensors`` x ``(string name, u32 n_dims, u64 dims[n_dims], u32 ggml type,
u64 offset)``; padding to ``general.alignment`` (default 32); tensor data, each tensor at
its offset from there. A string is ``u64 length`` + UTF-8 bytes; an array is ``u32 item
type, u64 count`` + items.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS; llama.cpp rejects more
SMALL_ARRAY = 1024  # numeric arrays shorter than this are decoded while parsing

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALARS: dict[GGUFValueType, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: _U32,
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT64: _U64,
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_NUMPY = {t: np.dtype(s.format) for t, s in _SCALARS.items()}


class GGUFFormatError(ValueError):
    """The bytes are not a well-formed GGUF header; the message says where and why."""


class _Array:
    """Where an array value lies; decoded by :meth:`GGUFFile.get`."""

    __slots__ = ("item_type", "count", "offset")

    def __init__(self, item_type: GGUFValueType, count: int, offset: int):
        self.item_type, self.count, self.offset = item_type, count, offset


class TensorInfo:
    """One tensor's header entry; ``data`` is its raw bytes in the file's memory map."""

    __slots__ = ("name", "shape", "tensor_type", "offset", "n_elements", "n_bytes", "_map")

    def __init__(self, name, shape, tensor_type, offset, n_elements, n_bytes, mapping):
        self.name: str = name
        self.shape: tuple[int, ...] = shape  # ggml order: shape[0] is the row length
        self.tensor_type: GGMLQuantizationType = tensor_type
        self.offset: int = offset  # absolute, in bytes from the start of the file
        self.n_elements: int = n_elements
        self.n_bytes: int = n_bytes
        self._map = mapping

    @property
    def data(self) -> np.ndarray:
        """uint8 [*numpy_shape[:-1], row_bytes] view: what ``gguf.quants.dequantize`` takes."""
        block, size = GGML_QUANT_SIZES[self.tensor_type]
        rows = tuple(reversed(self.shape[1:]))
        raw = self._map[self.offset : self.offset + self.n_bytes]
        return raw.reshape(*rows, self.shape[0] // block * size)

    def __repr__(self) -> str:
        return f"TensorInfo({self.name!r}, {self.shape}, {self.tensor_type.name})"


class GGUFFile:
    """Parses a GGUF file's header; tensor data stays in a read-only memory map.

    Raises:
        GGUFFormatError: bad magic, unsupported version, or a header that is truncated or
            inconsistent (unknown types, duplicate keys or tensors, bad alignment/offsets).
            Tensor data running past the end of the file is *not* checked here (see
            :meth:`truncated_tensor`).
        OSError: the file cannot be opened or mapped.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        if self.size < 4:
            raise GGUFFormatError(f"{self.size}-byte file has no GGUF magic")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._buf = memoryview(self._map)
        self.fields: dict[str, tuple[GGUFValueType, Any]] = {}
        self.tensors: list[TensorInfo] = []
        try:
            self._parse()
        except RecursionError:  # arrays of arrays of ... in a corrupt file
            raise GGUFFormatError("metadata arrays are nested too deeply") from None

    # ---------------------------------------------------------------- public

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value as Python objects (int, float, bool, str, list); arrays are
        decoded on each call, so keep the result rather than asking twice."""
        field = self.fields.get(key)
        if field is None:
            return default
        value = field[1]
        return self._decode(value) if isinstance(value, _Array) else value

    def value_type(self, key: str) -> GGUFValueType | None:
        field = self.fields.get(key)
        return None if field is None else field[0]

    def item_type(self, key: str) -> GGUFValueType | None:
        """The element type of an array value (None for scalars and missing keys)."""
        field = self.fields.get(key)
        return field[1].item_type if field is not None and isinstance(field[1], _Array) else None

    def evict(self, t: TensorInfo) -> None:
        """Drops ``t``'s pages from this process's resident memory (they stay in the page
        cache; touching ``t.data`` again reads them back). Streaming a model would
        otherwise keep the whole file resident until the map is closed."""
        raw = getattr(self._map, "_mmap", None)  # np.memmap's mmap.mmap
        if raw is None or not hasattr(mmap, "MADV_DONTNEED") or not t.n_bytes:
            return
        start = t.offset - t.offset % mmap.PAGESIZE
        raw.madvise(mmap.MADV_DONTNEED, start, min(t.offset + t.n_bytes, self.size) - start)

    def truncated_tensor(self) -> TensorInfo | None:
        """The first tensor whose bytes run past the end of the file, if any."""
        for t in self.tensors:
            if t.offset + t.n_bytes > self.size:
                return t
        return None

    # ---------------------------------------------------------------- parsing

    def _fail(self, offset: int, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"at byte {offset}: {what}")

    def _need(self, offset: int, n: int, what: str) -> None:
        if offset + n > self.size:
            raise self._fail(offset, f"{what} needs {n} bytes but the file ends at {self.size}")

    def _u32(self, o: int, what: str) -> int:
        self._need(o, 4, what)
        return _U32.unpack_from(self._buf, o)[0]

    def _u64(self, o: int, what: str) -> int:
        self._need(o, 8, what)
        return _U64.unpack_from(self._buf, o)[0]

    def _str(self, o: int, what: str) -> tuple[str, int]:
        n = self._u64(o, f"{what} length")
        self._need(o + 8, n, what)
        try:
            return str(self._buf[o + 8 : o + 8 + n], "utf-8"), o + 8 + n
        except UnicodeDecodeError:
            raise self._fail(o, f"{what} is not UTF-8") from None

    def _type(self, o: int, what: str) -> GGUFValueType:
        raw = self._u32(o, what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self._fail(o, f"unknown {what} {raw}") from None

    def _value(self, o: int, vtype: GGUFValueType, key: str) -> tuple[Any, int]:
        """(value, offset after it); arrays of strings or >= SMALL_ARRAY items are skipped."""
        if vtype == GGUFValueType.STRING:
            return self._str(o, f"value of {key!r}")
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            self._need(o, scalar.size, f"value of {key!r}")
            return scalar.unpack_from(self._buf, o)[0], o + scalar.size
        item = self._type(o, f"item type of array {key!r}")
        count = self._u64(o + 4, f"length of array {key!r}")
        start = o + 12
        if item in _SCALARS:
            end = start + count * _SCALARS[item].size
            self._need(start, end - start, f"array {key!r} ({count} items)")
            lazy = _Array(item, count, start)
            return (self._decode(lazy) if count < SMALL_ARRAY else lazy), end
        # Strings and nested arrays: walk the items (lengths are inline) without keeping them.
        # Each item takes at least 8 bytes, so a corrupt count fails here, not after a long loop.
        self._need(start, count * 8, f"array {key!r} ({count} items)")
        end = start
        if item == GGUFValueType.STRING:
            u64, buf = _U64.unpack_from, self._buf
            try:
                for _ in range(count):
                    end += 8 + u64(buf, end)[0]
            except struct.error:
                end = self.size + 1
            self._need(start, end - start, f"array {key!r} ({count} strings)")
        else:
            for i in range(count):
                _, end = self._value(end, item, f"{key}[{i}]")
        return _Array(item, count, start), end

    def _decode(self, a: _Array) -> list:
        if a.item_type in _NUMPY:
            out = np.frombuffer(self._buf, _NUMPY[a.item_type], a.count, a.offset)
            return out.tolist()
        if a.item_type == GGUFValueType.STRING:
            buf, u64, o, out = self._buf, _U64.unpack_from, a.offset, []
            try:
                for _ in range(a.count):
                    n = u64(buf, o)[0]
                    out.append(str(buf[o + 8 : o + 8 + n], "utf-8"))
                    o += 8 + n
            except UnicodeDecodeError:
                raise self._fail(o, f"string {len(out)} of an array is not UTF-8") from None
            return out
        out, o = [], a.offset
        for _ in range(a.count):  # nested arrays: small and rare; decode them fully
            v, o = self._value(o, a.item_type, "nested array")
            out.append(self._decode(v) if isinstance(v, _Array) else v)
        return out

    def _parse(self) -> None:
        if bytes(self._buf[:4]) != MAGIC:
            raise self._fail(0, f"expected magic {MAGIC!r}, found {bytes(self._buf[:4])!r}")
        version = self._u32(4, "version")
        if version & 0xFFFF == 0 and version:
            raise self._fail(4, "big-endian GGUF files are not supported")
        if version not in VERSIONS:
            raise self._fail(4, f"GGUF version {version} is not supported (supported: 2, 3)")
        self.version = version
        n_tensors = self._u64(8, "tensor count")
        n_kv = self._u64(16, "metadata count")
        # Lower bounds on the header size (a kv takes >= 13 bytes, a tensor info >= 32).
        self._need(24, 13 * n_kv + 32 * n_tensors, f"{n_kv} metadata entries, {n_tensors} tensors")
        o = 24
        for _ in range(n_kv):
            key, o = self._str(o, "metadata key")
            if key in self.fields:
                raise self._fail(o, f"duplicate metadata key {key!r}")
            vtype = self._type(o, f"value type of {key!r}")
            value, o = self._value(o + 4, vtype, key)
            self.fields[key] = (vtype, value)
        infos = []
        names = set()
        for _ in range(n_tensors):
            at = o
            name, o = self._str(o, "tensor name")
            if name in names:
                raise self._fail(at, f"duplicate tensor {name!r}")
            names.add(name)
            n_dims = self._u32(o, f"dimension count of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self._fail(o, f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS})")
            self._need(o + 4, 8 * n_dims + 12, f"tensor info of {name!r}")
            shape = struct.unpack_from(f"<{n_dims}Q", self._buf, o + 4)
            o += 4 + 8 * n_dims
            raw_type = _U32.unpack_from(self._buf, o)[0]
            offset = _U64.unpack_from(self._buf, o + 4)[0]
            try:
                ttype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise self._fail(o, f"tensor {name!r} has unknown ggml type {raw_type}") from None
            block, size = GGML_QUANT_SIZES[ttype]
            if shape[0] % block:
                raise self._fail(
                    o, f"tensor {name!r} rows of {shape[0]} are not whole {ttype.name} blocks"
                )
            infos.append((at, name, shape, ttype, offset, block, size))
            o += 12
        self.alignment = self._alignment()
        self.data_offset = o + -o % self.alignment
        for at, name, shape, ttype, offset, block, size in infos:
            if offset % self.alignment:
                raise self._fail(
                    at, f"tensor {name!r} offset {offset} is not {self.alignment}-aligned"
                )
            n = int(np.prod(shape, dtype=object))
            self.tensors.append(
                TensorInfo(
                    name, shape, ttype, self.data_offset + offset, n, n // block * size, self._map
                )
            )

    def _alignment(self) -> int:
        field = self.fields.get("general.alignment")
        if field is None:
            return DEFAULT_ALIGNMENT
        vtype, value = field
        if vtype != GGUFValueType.UINT32 or value == 0 or value & (value - 1):
            raise GGUFFormatError(f"general.alignment must be a power-of-two uint32, got {value!r}")
        return value
