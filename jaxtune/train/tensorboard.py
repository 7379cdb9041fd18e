"""A dependency-free TensorBoard scalar writer (and reader, for tests).

TensorBoard reads ``events.out.tfevents.*`` files: TFRecord framing (length, masked
CRC-32C, payload, masked CRC-32C) around ``Event`` protocol buffers. Scalars need four
proto fields, so they are encoded by hand here instead of pulling in TensorFlow,
tensorboard or tensorboardX.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecord uses."""
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def encode_event(
    wall_time: float,
    step: int,
    scalars: dict[str, float] | None = None,
    file_version: str | None = None,
) -> bytes:
    """``Event{wall_time=1, step=2, file_version=3, summary=5{value=1{tag=1, simple_value=2}}}``."""
    out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(
                1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", float(v))
            )
            for tag, v in scalars.items()
        )
        out += _bytes_field(5, values)
    return out


def _record(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return (
        header
        + struct.pack("<I", _masked_crc(header))
        + payload
        + struct.pack("<I", _masked_crc(payload))
    )


class EventWriter:
    """Appends scalar events to a new ``events.out.tfevents.*`` file in ``log_dir``."""

    def __init__(self, log_dir: str | Path):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = self.dir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
        self.file = open(self.path, "ab")  # noqa: SIM115 (kept open for the run)
        self.file.write(_record(encode_event(now, 0, file_version="brain.Event:2")))
        self.file.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Writes the finite numeric ``values`` of one step (others are skipped)."""
        clean = {
            k: float(v)
            for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v
        }
        if clean:
            self.file.write(_record(encode_event(time.time(), step, clean)))
            self.file.flush()

    def close(self) -> None:
        self.file.close()


# ------------------------------------------------------------------------- reading


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _parse(buf: bytes) -> list[tuple[int, int, object]]:
    """Flat (field, wire type, value) list of one protobuf message."""
    out, i = [], 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            value, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((number, wire, value))
    return out


def read_scalars(path: str | Path) -> list[tuple[int, str, float]]:
    """``(step, tag, value)`` of every scalar in an event file; checks every CRC."""
    data = Path(path).read_bytes()
    out, i = [], 0
    while i < len(data):
        header = data[i : i + 8]
        (n,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[i + 8 : i + 12])[0] != _masked_crc(header):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        payload = data[i + 12 : i + 12 + n]
        if struct.unpack("<I", data[i + 12 + n : i + 16 + n])[0] != _masked_crc(payload):
            raise ValueError(f"{path}: bad data CRC at byte {i}")
        i += 16 + n
        fields = _parse(payload)
        step = next((v for f, _, v in fields if f == 2), 0)
        for f, _, summary in fields:
            if f != 5:
                continue
            for _, _, value in _parse(summary):
                parts = {num: v for num, _, v in _parse(value)}
                out.append((step, parts[1].decode(), struct.unpack("<f", parts[2])[0]))
    return out
