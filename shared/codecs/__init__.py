"""Feature codecs: compress ``[tokens, dim]`` visual features for the wire.

    codec = build_codec("int8")                  # preset, or a spec such as "int8|zstd:3"
    payload = codec.encode(features)
    features = codec.decode(payload, shape=(tokens, dim), dtype=torch.float32)

Token reducers (``prune``, ``pool``, ``tome``) send fewer tokens: decode with
``codec.decoded_shape(tokens, dim)``, which is what the packet header declares.

Calibrated stages (``pca``, ``kmeans``, ``sparse``, ``ae``, ``salient``, ``zstd:dict=1``) need the artifact
`splitvlm calibrate` writes: ``build_codec(spec, artifact=path)`` (see `shared.codecs.calibration`).

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
from shared.codecs.calibration import CalibrationArtifact
from shared.codecs.pipeline import MAX_DECODED_BYTES, PRESETS, Codec, build_codec
from shared.codecs.reduce import TokenReducer

__all__ = [
    "MAX_DECODED_BYTES",
    "PRESETS",
    "STAGES",
    "ByteStage",
    "CalibrationArtifact",
    "Codec",
    "CodecContext",
    "FieldSpec",
    "Param",
    "Stage",
    "TensorStage",
    "TokenReducer",
    "build_codec",
    "register_stage",
]
