"""``zstd``: Zstandard entropy coding of the serialized fields (RFC 8878).

    bytes ──compress(level)──► zstd frame (content size + xxhash checksum)
    zstd frame ──bounded decompress──► bytes (at most the size the declared shape allows)

The frame records its content size and a checksum, so truncation, appended
data and bit flips are detected by the decoder rather than yielding garbage.
"""

from __future__ import annotations

from typing import ClassVar

import zstandard

from shared.codecs.base import ByteStage, CodecContext, Param, register_stage
from shared.errors import CodecError, PacketTooLargeError


@register_stage
class Zstd(ByteStage):
    name = "zstd"
    params: ClassVar[tuple[Param, ...]] = (Param("level", int, 3, lo=1, hi=22),)

    level: int

    def max_encoded_size(self, size: int) -> int:
        # ZSTD_COMPRESSBOUND from zstd.h, plus the frame header (<= 18) and checksum (4).
        margin = (128 * 1024 - size) >> 11 if size < 128 * 1024 else 0
        return size + (size >> 8) + margin + 22

    def encode(self, data: bytes, ctx: CodecContext) -> bytes:
        return zstandard.ZstdCompressor(level=self.level, write_checksum=True).compress(data)

    def decode(self, data: bytes, ctx: CodecContext, max_size: int) -> bytes:
        try:
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as e:
            raise CodecError(f"corrupt payload: not a zstd frame ({e})") from None
        # decompress() allocates a declared content size as-is and ignores max_output_size,
        # so a declared size must be bounded here first.
        if declared > max_size:
            raise PacketTooLargeError(
                f"zstd frame declares {declared} bytes; the declared feature shape allows at most {max_size}"
            )
        dctx = zstandard.ZstdDecompressor()
        try:
            return dctx.decompress(data, max_output_size=max_size, allow_extra_data=False)
        except zstandard.ZstdError as e:
            if declared < 0 and _exceeds(dctx, data, max_size):
                raise PacketTooLargeError(
                    f"zstd frame decompresses to more than {max_size} bytes, "
                    "the most the declared feature shape allows"
                ) from None
            raise CodecError(f"corrupt payload: zstd decompression failed ({e})") from None


def _exceeds(dctx: zstandard.ZstdDecompressor, data: bytes, limit: int) -> bool:
    """Whether a frame without a content size holds more than `limit` bytes (reads at most limit + 1)."""
    try:
        with dctx.stream_reader(data, read_across_frames=False) as reader:
            return len(reader.read(limit + 1)) > limit
    except zstandard.ZstdError:
        return False
