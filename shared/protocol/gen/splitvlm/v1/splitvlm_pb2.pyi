from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SplitPoint(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPLIT_POINT_UNSPECIFIED: _ClassVar[SplitPoint]
    AFTER_VISION_TOWER: _ClassVar[SplitPoint]
    AFTER_PROJECTOR: _ClassVar[SplitPoint]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
SPLIT_POINT_UNSPECIFIED: SplitPoint
AFTER_VISION_TOWER: SplitPoint
AFTER_PROJECTOR: SplitPoint
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType

class IntList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ...) -> None: ...

class FeatureHeader(_message.Message):
    __slots__ = ("format_version", "request_id", "model_fingerprint", "split_point", "codec_spec", "codec_fingerprint", "shape", "dtype", "meta", "payload_size", "payload_crc32")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: IntList
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[IntList, _Mapping]] = ...) -> None: ...
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SPLIT_POINT_FIELD_NUMBER: _ClassVar[int]
    CODEC_SPEC_FIELD_NUMBER: _ClassVar[int]
    CODEC_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_CRC32_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    request_id: str
    model_fingerprint: str
    split_point: SplitPoint
    codec_spec: str
    codec_fingerprint: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    meta: _containers.MessageMap[str, IntList]
    payload_size: int
    payload_crc32: int
    def __init__(self, format_version: _Optional[int] = ..., request_id: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., split_point: _Optional[_Union[SplitPoint, str]] = ..., codec_spec: _Optional[str] = ..., codec_fingerprint: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., meta: _Optional[_Mapping[str, IntList]] = ..., payload_size: _Optional[int] = ..., payload_crc32: _Optional[int] = ...) -> None: ...

class FeaturePacket(_message.Message):
    __slots__ = ("header", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: FeatureHeader
    payload: bytes
    def __init__(self, header: _Optional[_Union[FeatureHeader, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class GenerationOptions(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("ms",)
    class MsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MS_FIELD_NUMBER: _ClassVar[int]
    ms: _containers.ScalarMap[str, float]
    def __init__(self, ms: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TextChunk(_message.Message):
    __slots__ = ("text", "token_ids", "done", "timings", "payload_bytes", "wire_bytes", "request_id", "codec_spec", "cache_hit", "feature_bytes", "rate_control", "prompt_tokens", "feature_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODEC_SPEC_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    FEATURE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RATE_CONTROL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    done: bool
    timings: Timings
    payload_bytes: int
    wire_bytes: int
    request_id: str
    codec_spec: str
    cache_hit: bool
    feature_bytes: int
    rate_control: str
    prompt_tokens: int
    feature_id: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., done: _Optional[bool] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., payload_bytes: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., request_id: _Optional[str] = ..., codec_spec: _Optional[str] = ..., cache_hit: _Optional[bool] = ..., feature_bytes: _Optional[int] = ..., rate_control: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., feature_id: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("start", "payload_chunk")
    START_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_CHUNK_FIELD_NUMBER: _ClassVar[int]
    start: GenerateStart
    payload_chunk: bytes
    def __init__(self, start: _Optional[_Union[GenerateStart, _Mapping]] = ..., payload_chunk: _Optional[bytes] = ...) -> None: ...

class GenerateStart(_message.Message):
    __slots__ = ("header", "prompt", "options")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    header: FeatureHeader
    prompt: str
    options: GenerationOptions
    def __init__(self, header: _Optional[_Union[FeatureHeader, _Mapping]] = ..., prompt: _Optional[str] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("service", "version", "format_versions", "model_id", "model_fingerprint", "split_points", "codecs", "codec_fingerprints", "max_packet_bytes", "architecture", "notice")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SPLIT_POINTS_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    MAX_PACKET_BYTES_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    version: str
    format_versions: _containers.RepeatedScalarFieldContainer[int]
    model_id: str
    model_fingerprint: str
    split_points: _containers.RepeatedScalarFieldContainer[SplitPoint]
    codecs: _containers.RepeatedScalarFieldContainer[str]
    codec_fingerprints: _containers.RepeatedScalarFieldContainer[str]
    max_packet_bytes: int
    architecture: str
    notice: str
    def __init__(self, service: _Optional[str] = ..., version: _Optional[str] = ..., format_versions: _Optional[_Iterable[int]] = ..., model_id: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., split_points: _Optional[_Iterable[_Union[SplitPoint, str]]] = ..., codecs: _Optional[_Iterable[str]] = ..., codec_fingerprints: _Optional[_Iterable[str]] = ..., max_packet_bytes: _Optional[int] = ..., architecture: _Optional[str] = ..., notice: _Optional[str] = ...) -> None: ...

class FrameInfo(_message.Message):
    __slots__ = ("stream_id", "sequence", "capture_unix_ms")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    sequence: int
    capture_unix_ms: int
    def __init__(self, stream_id: _Optional[str] = ..., sequence: _Optional[int] = ..., capture_unix_ms: _Optional[int] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("frame", "packet")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    PACKET_FIELD_NUMBER: _ClassVar[int]
    frame: FrameInfo
    packet: FeaturePacket
    def __init__(self, frame: _Optional[_Union[FrameInfo, _Mapping]] = ..., packet: _Optional[_Union[FeaturePacket, _Mapping]] = ...) -> None: ...

class PublishAck(_message.Message):
    __slots__ = ("sequence", "feature_id")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_ID_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    feature_id: str
    def __init__(self, sequence: _Optional[int] = ..., feature_id: _Optional[str] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("feature_id", "stream_id", "prompt", "options")
    FEATURE_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    feature_id: str
    stream_id: str
    prompt: str
    options: GenerationOptions
    def __init__(self, feature_id: _Optional[str] = ..., stream_id: _Optional[str] = ..., prompt: _Optional[str] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ...) -> None: ...

class AskRequest(_message.Message):
    __slots__ = ("image", "prompt", "options", "codec", "request_id", "target_bytes", "target_fidelity")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIDELITY_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    prompt: str
    options: GenerationOptions
    codec: str
    request_id: str
    target_bytes: int
    target_fidelity: float
    def __init__(self, image: _Optional[bytes] = ..., prompt: _Optional[str] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., codec: _Optional[str] = ..., request_id: _Optional[str] = ..., target_bytes: _Optional[int] = ..., target_fidelity: _Optional[float] = ...) -> None: ...
