"""FeaturePacket: build on the Tx, validate and open on the Rx.

    VisionFeatures ──codec.encode──► payload ─┐
    model/codec fingerprints, shape, meta ────┴─► FeatureHeader + payload = FeaturePacket

Every size read from a header is checked against `PacketLimits` before anything
is allocated from it; the payload is checked for length and CRC-32 before it is
decoded.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from shared.errors import (
    ChecksumError,
    PacketError,
    PacketTooLargeError,
    VersionError,
)
from shared.protocol import pb
from shared.split.base import SplitPoint, VisionFeatures

if TYPE_CHECKING:
    from shared.codecs import Codec

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)

_DTYPES: dict[pb.DType, torch.dtype] = {
    pb.FLOAT32: torch.float32,
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}
_SPLIT_POINTS: dict[pb.SplitPoint, SplitPoint] = {
    pb.AFTER_VISION_TOWER: SplitPoint.AFTER_VISION_TOWER,
    pb.AFTER_PROJECTOR: SplitPoint.AFTER_PROJECTOR,
}
_SPLIT_CODES = {v: k for k, v in _SPLIT_POINTS.items()}


@dataclass(frozen=True)
class PacketLimits:
    """Upper bounds an Rx enforces on anything a packet declares."""

    max_packet_bytes: int = 64 * 2**20
    max_tokens: int = 65_536
    max_dim: int = 16_384
    max_decoded_bytes: int = 512 * 2**20
    max_meta_keys: int = 16
    max_meta_values: int = 4_096
    max_request_id_chars: int = 128
    max_fingerprint_chars: int = 128  # "sha256:" + 64 hex digits is 71
    max_codec_spec_chars: int = 256
    max_meta_key_chars: int = 64


def split_point_to_pb(split: SplitPoint) -> pb.SplitPoint:
    return _SPLIT_CODES[split]


def split_point_from_pb(code: pb.SplitPoint) -> SplitPoint:
    try:
        return _SPLIT_POINTS[code]
    except KeyError:
        raise PacketError(f"unknown split point code {code}") from None


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def build_header(
    *,
    request_id: str,
    model_fingerprint: str,
    split_point: SplitPoint,
    codec_spec: str,
    codec_fingerprint: str,
    features: VisionFeatures,
    payload: bytes,
    shape: tuple[int, int] | None = None,
) -> pb.FeatureHeader:
    """The header for `payload`, which encodes `features` (decoded shape/dtype recorded).

    `shape` is the decoded shape when the codec changes the token count
    (`Codec.decoded_shape`); `features.meta` must then describe that count.
    """
    header = pb.FeatureHeader(
        format_version=FORMAT_VERSION,
        request_id=request_id,
        model_fingerprint=model_fingerprint,
        split_point=split_point_to_pb(split_point),
        codec_spec=codec_spec,
        codec_fingerprint=codec_fingerprint,
        shape=list(shape if shape is not None else features.features.shape),
        dtype=_DTYPE_CODES[features.features.dtype],
        payload_size=len(payload),
        payload_crc32=crc32(payload),
    )
    for key, values in features.meta.items():
        header.meta[key].values.extend(int(v) for v in values)
    return header


def _reject_unknown_fields(msg: pb.FeatureHeader | pb.FeaturePacket, what: str) -> None:
    unknown = UnknownFieldSet(msg)
    if len(unknown):
        numbers = sorted({f.field_number for f in unknown})
        raise PacketError(
            f"{what} carries fields this side does not know (field numbers {numbers}); "
            "it was probably written by a newer splitvlm"
        )


def validate_header(header: pb.FeatureHeader, limits: PacketLimits) -> None:
    """Check everything a header declares before any of it is trusted."""
    _reject_unknown_fields(header, "feature header")
    for name, value, limit in (
        ("request_id", header.request_id, limits.max_request_id_chars),
        ("model_fingerprint", header.model_fingerprint, limits.max_fingerprint_chars),
        ("codec_fingerprint", header.codec_fingerprint, limits.max_fingerprint_chars),
        ("codec_spec", header.codec_spec, limits.max_codec_spec_chars),
    ):
        if len(value) > limit:
            raise PacketError(f"header field {name} has {len(value)} characters; at most {limit}")
    if header.format_version not in SUPPORTED_FORMAT_VERSIONS:
        raise VersionError(
            f"packet format version {header.format_version} is not supported; "
            f"this side reads versions {list(SUPPORTED_FORMAT_VERSIONS)}"
        )
    split_point_from_pb(header.split_point)
    if header.dtype not in _DTYPES:
        raise PacketError(f"unknown feature dtype code {header.dtype}")
    if len(header.shape) != 2:
        raise PacketError(f"feature shape must be [tokens, dim], got {list(header.shape)}")
    tokens, dim = header.shape
    if not 1 <= tokens <= limits.max_tokens:
        raise PacketTooLargeError(f"packet declares {tokens} tokens; allowed 1..{limits.max_tokens}")
    if not 1 <= dim <= limits.max_dim:
        raise PacketTooLargeError(f"packet declares feature dim {dim}; allowed 1..{limits.max_dim}")
    decoded = tokens * dim * _DTYPES[header.dtype].itemsize
    if decoded > limits.max_decoded_bytes:
        raise PacketTooLargeError(
            f"packet declares {decoded} decoded bytes; this side allows {limits.max_decoded_bytes}"
        )
    if header.payload_size > limits.max_packet_bytes:
        raise PacketTooLargeError(
            f"payload of {header.payload_size} bytes exceeds the limit of {limits.max_packet_bytes}"
        )
    if len(header.meta) > limits.max_meta_keys:
        raise PacketError(f"packet has {len(header.meta)} metadata keys; at most {limits.max_meta_keys}")
    for key, values in header.meta.items():
        if len(key) > limits.max_meta_key_chars:
            raise PacketError(
                f"a metadata key has {len(key)} characters; at most {limits.max_meta_key_chars}"
            )
        if len(values.values) > limits.max_meta_values:
            raise PacketError(
                f"metadata '{key}' has {len(values.values)} values; at most {limits.max_meta_values}"
            )
    if "tokens_per_image" in header.meta:
        per_image = list(header.meta["tokens_per_image"].values)
        if any(n <= 0 for n in per_image) or sum(per_image) != tokens:
            raise PacketError(f"tokens_per_image {per_image} does not add up to the {tokens} tokens declared")


def verify_payload(header: pb.FeatureHeader, payload: bytes) -> None:
    if len(payload) != header.payload_size:
        raise PacketError(
            f"truncated or padded payload: header declares {header.payload_size} bytes, got {len(payload)}"
        )
    actual = crc32(payload)
    if actual != header.payload_crc32:
        raise ChecksumError(
            f"payload checksum mismatch: header says crc32={header.payload_crc32:08x}, "
            f"payload has crc32={actual:08x}; the packet was corrupted in transit"
        )


def header_dtype(header: pb.FeatureHeader) -> torch.dtype:
    return _DTYPES[header.dtype]


def header_meta(header: pb.FeatureHeader) -> dict[str, list[int]]:
    return {key: list(values.values) for key, values in header.meta.items()}


def packet_to_bytes(header: pb.FeatureHeader, payload: bytes) -> bytes:
    return pb.FeaturePacket(header=header, payload=payload).SerializeToString()


def packet_from_bytes(data: bytes, limits: PacketLimits) -> tuple[pb.FeatureHeader, bytes]:
    """Parse and fully validate a serialized FeaturePacket (the HTTP upload form)."""
    # Header and field framing add a little on top of the payload bound.
    if len(data) > limits.max_packet_bytes + 64 * 1024:
        raise PacketTooLargeError(
            f"packet of {len(data)} bytes exceeds the limit of {limits.max_packet_bytes}"
        )
    packet = pb.FeaturePacket()
    try:
        packet.ParseFromString(data)
    except DecodeError as exc:
        raise PacketError(f"not a FeaturePacket: protobuf parse failed ({exc})") from None
    _reject_unknown_fields(packet, "feature packet")
    if not packet.HasField("header"):
        raise PacketError("not a FeaturePacket: no header")
    validate_header(packet.header, limits)
    verify_payload(packet.header, packet.payload)
    return packet.header, packet.payload


def features_from_payload(header: pb.FeatureHeader, payload: bytes, codec: Codec) -> VisionFeatures:
    """Decode a verified payload with `codec` (a `shared.codecs.Codec`)."""
    shape = (int(header.shape[0]), int(header.shape[1]))
    features = codec.decode(payload, shape=shape, dtype=header_dtype(header))
    return VisionFeatures(features=features, meta=header_meta(header))


def raw_feature_bytes(header: pb.FeatureHeader) -> int:
    return math.prod(header.shape) * header_dtype(header).itemsize
