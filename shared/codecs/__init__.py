"""Feature codecs: compress ``[tokens, dim]`` visual features for the wire.

    codec = build_codec("int8")                  # preset, or a spec such as "int8|zstd:3"
    payload = codec.encode(features)
    features = codec.decode(payload, shape=(tokens, dim), dtype=torch.float32)

See `shared.codecs.base` for the stage model and `shared.codecs.pipeline` for
the spec grammar.
"""

from shared.codecs.base import (
    STAGES,
    ByteStage,
    CodecContext,
    FieldSpec,
    Param,
    Stage,
    TensorStage,
    register_stage,
)
from shared.codecs.pipeline import MAX_DECODED_BYTES, PRESETS, Codec, build_codec

__all__ = [
    "MAX_DECODED_BYTES",
    "PRESETS",
    "STAGES",
    "ByteStage",
    "Codec",
    "CodecContext",
    "FieldSpec",
    "Param",
    "Stage",
    "TensorStage",
    "build_codec",
    "register_stage",
]
