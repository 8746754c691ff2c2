"""Collecting a stream of TextChunk messages into one answer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from shared.protocol import pb


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    payload_bytes: int = 0
    wire_bytes: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    request_id: str = ""
    codec_spec: str = ""
    cache_hit: bool = False
    feature_bytes: int = 0
    rate_control: str = ""  # the Tx's rate-control note, when it chose the codec

    @classmethod
    def from_chunks(cls, chunks: Iterable[pb.TextChunk]) -> Answer:
        text: list[str] = []
        ids: list[int] = []
        last: pb.TextChunk | None = None
        for chunk in chunks:
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            last = chunk
        if last is None or not last.done:
            raise RuntimeError("the stream ended before its final chunk")
        return cls(
            text="".join(text),
            token_ids=ids,
            payload_bytes=last.payload_bytes,
            wire_bytes=last.wire_bytes,
            timings_ms=dict(last.timings.ms),
            request_id=last.request_id,
            codec_spec=last.codec_spec,
            cache_hit=last.cache_hit,
            feature_bytes=last.feature_bytes,
            rate_control=last.rate_control,
        )
