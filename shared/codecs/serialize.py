"""The bounded tensor table: fields <-> bytes, between tensor stages and byte stages.

    {"q": int8 [T, D], "scale": float32 [T]} ──pack──► bytes ──unpack──► same fields

Wire format (all integers little-endian)::

    u8 version | u8 field count | entry * count | data * count
    entry = u8 name length | name (ASCII) | u8 dtype code | u8 ndim | u32 dim * ndim
    data  = the field's elements in C order, native little-endian, back to back

The table is self-describing so a payload can be inspected on its own, but the
decoder trusts none of it: every entry is checked against the layout that the
declared shape implies, and the data length must match exactly, before any
tensor is allocated.
"""

from __future__ import annotations

import math
import struct

import torch

from shared.codecs.base import Fields, Layout, dtype_name
from shared.errors import CodecError, PacketTooLargeError

VERSION = 1

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int8: 4,
    torch.uint8: 5,
    torch.int16: 6,
    torch.int32: 7,
}
DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}


def table_size(layout: Layout) -> int:
    return 2 + sum(1 + len(name) + 2 + 4 * len(spec.shape) for name, spec in layout.items())


def max_packed_size(layout: Layout) -> int:
    """The largest `pack` output any payload for `layout` can have."""
    return table_size(layout) + sum(spec.max_nbytes for spec in layout.values())


def pack(fields: Fields, layout: Layout) -> bytes:
    if list(fields) != list(layout):
        raise CodecError(f"pipeline produced fields {list(fields)}, expected {list(layout)}")
    table = [struct.pack("<BB", VERSION, len(fields))]
    data = []
    for name, t in fields.items():
        layout[name].check(name, t.dtype, tuple(t.shape))
        encoded = name.encode("ascii")
        table.append(struct.pack(f"<B{len(encoded)}sBB{t.dim()}I", len(encoded), encoded,
                                 DTYPE_CODES[t.dtype], t.dim(), *t.shape))  # fmt: skip
        data.append(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return b"".join(table + data)


class _Reader:
    """Cursor over untrusted bytes; every read is bounds-checked."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.view = memoryview(data)
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.view) - self.pos:
            raise CodecError(
                f"tensor table truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"only {len(self.view) - self.pos} left"
            )
        chunk = self.view[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]


def unpack(data: bytes | bytearray | memoryview, layout: Layout) -> Fields:
    r = _Reader(data)
    version = r.u8("version")
    if version != VERSION:
        raise CodecError(f"tensor table version {version} is not supported (expected {VERSION})")
    count = r.u8("field count")
    if count != len(layout):
        raise CodecError(f"tensor table holds {count} fields, expected {len(layout)} ({', '.join(layout)})")

    entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for index, (expected, spec) in enumerate(layout.items()):
        raw_name = bytes(r.take(r.u8(f"field {index} name length"), f"field {index} name"))
        name = raw_name.decode("ascii", errors="replace")
        if name != expected:
            raise CodecError(f"tensor table field {index} is named {name!r}, expected {expected!r}")
        code = r.u8(f"field {name!r} dtype")
        if code not in DTYPES_BY_CODE:
            raise CodecError(f"field {name!r} has unknown dtype code {code}")
        ndim = r.u8(f"field {name!r} ndim")
        shape = struct.unpack(f"<{ndim}I", r.take(4 * ndim, f"field {name!r} shape"))
        dtype = DTYPES_BY_CODE[code]
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > spec.max_nbytes:
            raise PacketTooLargeError(
                f"field {name!r} declares shape {shape} {dtype_name(dtype)} ({nbytes} bytes); "
                f"the declared feature shape allows at most {spec.shape} ({spec.max_nbytes} bytes)"
            )
        spec.check(name, dtype, shape)
        entries.append((name, dtype, shape))

    expected_bytes = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in entries)
    left = len(r.view) - r.pos
    if left != expected_bytes:
        raise CodecError(f"tensor table declares {expected_bytes} data bytes, payload holds {left}")
    fields: Fields = {}
    for name, dtype, shape in entries:
        chunk = r.take(math.prod(shape) * dtype.itemsize, f"field {name!r} data")
        # bytearray copies: the result must own writable memory, not alias the payload.
        flat = torch.frombuffer(bytearray(chunk), dtype=dtype) if len(chunk) else torch.empty(0, dtype=dtype)
        fields[name] = flat.reshape(shape)
    return fields
