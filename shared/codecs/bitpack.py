"""Pack unsigned codes of `bits` bits each (1..8; 1..16 with `pack_wide`) into bytes, LSB first, and back.

    codes uint8 [n] (each < 2^bits) ──► bit planes ──► uint8 [ceil(n * bits / 8)]
    (`pack_wide` / `unpack_wide`: the same for codes of up to 16 bits, e.g. VQ indices)

The same little-endian bit order as `linear_quant`'s sub-8-bit packing.
"""

from __future__ import annotations

import numpy as np


def packed_len(n: int, bits: int) -> int:
    return -(-n * bits // 8)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (any shape, each < 2^bits) -> uint8 [packed_len(codes.size, bits)]."""
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1, 1)
    if bits == 8:
        return flat.reshape(-1).copy()
    planes = np.unpackbits(flat, axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of `pack_bits`: uint8 [n] codes. `packed` must hold packed_len(n, bits) bytes."""
    if packed.size != packed_len(n, bits):
        raise ValueError(
            f"expected {packed_len(n, bits)} packed bytes for {n} {bits}-bit codes, got {packed.size}"
        )
    if bits == 8:
        return np.asarray(packed, dtype=np.uint8).reshape(-1).copy()
    planes = np.unpackbits(np.asarray(packed, dtype=np.uint8), count=n * bits, bitorder="little")
    return np.packbits(planes.reshape(n, bits), axis=1, bitorder="little").reshape(n)


def pack_wide(codes: np.ndarray, bits: int) -> np.ndarray:
    """`pack_bits` for codes of up to 16 bits: unsigned ints (each < 2^bits) -> uint8 [packed_len]."""
    if bits <= 8:
        return pack_bits(np.asarray(codes).astype(np.uint8), bits)
    pairs = np.ascontiguousarray(codes, dtype="<u2").reshape(-1, 1).view(np.uint8)  # [n, 2], LSB first
    planes = np.unpackbits(pairs, axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_wide(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of `pack_wide`: uint16 [n] codes. `packed` must hold packed_len(n, bits) bytes."""
    if bits <= 8:
        return unpack_bits(packed, n, bits).astype(np.uint16)
    if packed.size != packed_len(n, bits):
        raise ValueError(
            f"expected {packed_len(n, bits)} packed bytes for {n} {bits}-bit codes, got {packed.size}"
        )
    planes = np.zeros((n, 16), dtype=np.uint8)
    planes[:, :bits] = np.unpackbits(
        np.asarray(packed, dtype=np.uint8), count=n * bits, bitorder="little"
    ).reshape(n, bits)
    return np.packbits(planes, axis=1, bitorder="little").view("<u2").reshape(n).astype(np.uint16)
