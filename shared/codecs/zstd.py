"""``zstd``: Zstandard entropy coding of the serialized fields (RFC 8878).

    bytes ──compress(level)──► zstd frame (content size + xxhash checksum)
    zstd frame ──bounded decompress──► bytes (at most the size the declared shape allows)

The frame records its content size and a checksum, so truncation, appended
data and bit flips are detected by the decoder rather than yielding garbage.

``zstd:level=3,dict=1`` compresses with a dictionary trained on calibration
packets (``zstandard.train_dictionary``, the COVER algorithm of Liu et al.,
"Effective construction of relative Lempel-Ziv dictionaries", 2016), stored in
the calibration artifact; small packets, whose statistics a plain frame has no
room to learn, shrink the most::

    calibrate: serialized packets ──train_dictionary──► dict bytes (artifact tensor "dict", uint8)
    encode:    bytes ──compress(level, dict)──► frame (dict id, content size, checksum)
    decode:    frame ──bounded decompress(dict)──► bytes
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
import zstandard

from shared.codecs.base import ByteStage, CodecContext, Param, register_stage
from shared.codecs.calibration import CalibratedStage
from shared.errors import CodecError, PacketTooLargeError


@register_stage
class Zstd(CalibratedStage, ByteStage):
    name = "zstd"
    params: ClassVar[tuple[Param, ...]] = (
        Param("level", int, 3, lo=1, hi=22),
        Param("dict", int, 0, lo=0, hi=1, keyword_only=True),
    )
    fits_on = "bytes"

    level: int
    dict: int
    _dict: zstandard.ZstdCompressionDict | None = None

    @property
    def spec(self) -> str:
        # dict=0 is left out so plain zstd keeps its canonical spec (and fingerprint).
        return f"{self.name}:level={self.level}" + (",dict=1" if self.dict else "")

    def needs_calibration(self) -> bool:
        return bool(self.dict)

    def fit(self, samples: Sequence[bytes]) -> builtins.dict[str, torch.Tensor]:
        data = train_dictionary([bytes(s) for s in samples], self.level)
        tensors = {"dict": torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()}
        self.load_state(tensors, None)
        return tensors

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        t = tensors.get("dict")
        if t is None or t.dtype != torch.uint8 or t.dim() != 1 or not 8 <= t.numel() <= MAX_DICT_BYTES:
            raise CodecError(
                f"calibration artifact for 'zstd' needs a uint8 tensor 'dict' of 8..{MAX_DICT_BYTES} bytes"
            )
        self._dict = zstandard.ZstdCompressionDict(t.numpy().tobytes())

    def _compressor(self) -> zstandard.ZstdCompressor:
        if self.dict:
            self.require_calibrated()
            return zstandard.ZstdCompressor(level=self.level, write_checksum=True, dict_data=self._dict)
        return zstandard.ZstdCompressor(level=self.level, write_checksum=True)

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        if self.dict:
            self.require_calibrated()
            return zstandard.ZstdDecompressor(dict_data=self._dict)
        return zstandard.ZstdDecompressor()

    def max_encoded_size(self, size: int) -> int:
        # ZSTD_COMPRESSBOUND from zstd.h, plus the frame header (<= 18) and checksum (4).
        margin = (128 * 1024 - size) >> 11 if size < 128 * 1024 else 0
        return size + (size >> 8) + margin + 22

    def encode(self, data: bytes, ctx: CodecContext) -> bytes:
        return self._compressor().compress(data)

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
        dctx = self._decompressor()
        try:
            return dctx.decompress(data, max_output_size=max_size, allow_extra_data=False)
        except zstandard.ZstdError as e:
            if declared < 0 and _exceeds(dctx, data, max_size):
                raise PacketTooLargeError(
                    f"zstd frame decompresses to more than {max_size} bytes, "
                    "the most the declared feature shape allows"
                ) from None
            raise CodecError(f"corrupt payload: zstd decompression failed ({e})") from None


MAX_DICT_BYTES = 1 << 20


def train_dictionary(samples: list[bytes], level: int) -> bytes:
    """A zstd dictionary for packets like `samples`: COVER-trained, or raw content if too few samples."""
    total = sum(len(s) for s in samples)
    if not samples or total == 0:
        raise CodecError("zstd dictionary training needs at least one non-empty calibration packet")
    size = min(16 * 1024, max(1024, total // 8))
    try:
        chunks: list[bytes | bytearray | memoryview] = list(samples)
        trained = zstandard.train_dictionary(size, chunks, level=level)
        return bytes(trained.as_bytes())
    except zstandard.ZstdError:
        # Too little data for COVER: the most recent packets themselves make a usable raw dictionary.
        return b"".join(samples)[-size:]


def _exceeds(dctx: zstandard.ZstdDecompressor, data: bytes, limit: int) -> bool:
    """Whether a frame without a content size holds more than `limit` bytes (reads at most limit + 1)."""
    try:
        with dctx.stream_reader(data, read_across_frames=False) as reader:
            return len(reader.read(limit + 1)) > limit
    except zstandard.ZstdError:
        return False
