"""Service configuration: one pydantic settings object per service.

Every field can be set by environment variable (``SPLITVLM_RX_GRPC_PORT=...``,
``SPLITVLM_TX_RX_ADDRESS=...``); the CLI flags of `splitvlm rx serve` / `tx serve`
(`shared.cli.SETTING_FLAGS`) win over them. List settings take comma-separated values
(``SPLITVLM_RX_CODECS=int8,fp16``) or a JSON list. `splitvlm config show rx|tx` prints
every setting with its variable, flag, default and current value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from shared.models.registry import DEFAULT_MODEL, default_cache_dir
from shared.protocol.packet import PacketLimits
from shared.split.base import SplitPoint

__all__ = ["DEFAULT_MODEL", "LogLevel", "RxSettings", "TxSettings", "split_codec_list"]

LogLevel = Literal["debug", "info", "warning", "error"]


def split_codec_list(text: str) -> list[str]:
    """Comma-separated codec specs; a piece like ``granularity=token`` continues the previous spec."""
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if specs and "=" in piece.split("|")[0] and ":" not in piece.split("|")[0]:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


class _CommaListEnv(EnvSettingsSource):
    """Environment variables where list settings also take ``a,b,c`` (JSON lists still work)."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        if isinstance(value, str) and not value.lstrip().startswith(("[", "{")):
            if field_name == "codecs":
                return split_codec_list(value)
            return [v.strip() for v in value.split(",") if v.strip()]
        return json.loads(value)


def _sources(
    settings_cls: type[BaseSettings],
    init_settings: PydanticBaseSettingsSource,
    dotenv_settings: PydanticBaseSettingsSource,
    file_secret_settings: PydanticBaseSettingsSource,
) -> tuple[PydanticBaseSettingsSource, ...]:
    return (init_settings, _CommaListEnv(settings_cls), dotenv_settings, file_secret_settings)


class RxSettings(BaseSettings):
    """The server side: connector + language model."""

    model_config = SettingsConfigDict(env_prefix="SPLITVLM_RX_", extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="hub id, local folder or builtin:NAME")
    split_point: SplitPoint = SplitPoint.AFTER_VISION_TOWER
    host: str = "127.0.0.1"
    grpc_port: int = Field(50061, ge=0, le=65535)
    http_port: int = Field(8061, ge=0, le=65535)
    codecs: list[str] = Field(
        default_factory=lambda: ["lossless", "fp16", "int8"],
        description="codec presets or specs this Rx accepts",
    )
    codec_artifacts: list[Path] = Field(
        default_factory=list,
        description="calibration artifacts (splitvlm calibrate); each enables its calibrated codec spec",
    )
    fold_decoder: bool = Field(
        True,
        description="fold a linear codec decoder (pca, sparse) into the projector's first Linear "
        "(compressed-domain decoding); codecs that cannot be folded decode normally",
    )
    max_packet_bytes: int = Field(64 * 2**20, gt=0)
    max_tokens: int = Field(65_536, gt=0, description="most visual tokens one packet may declare")
    max_decoded_bytes: int = Field(512 * 2**20, gt=0)
    max_prompt_chars: int = Field(8_192, gt=0)
    default_max_new_tokens: int = Field(32, gt=0)
    max_new_tokens_limit: int = Field(512, gt=0)
    grpc_workers: int = Field(4, gt=0)
    cache_dir: Path = Field(default_factory=default_cache_dir)
    log_level: LogLevel = Field("info", description="log level; info logs one access line per request")
    log_json: bool = Field(False, description="log one JSON object per line (for log shippers)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return _sources(settings_cls, init_settings, dotenv_settings, file_secret_settings)

    # ---- feature store, push mode and stored-feature queries (issue 13) ----
    store: Literal["memory", "redis"] = Field(
        "memory", description="feature store backend (SPLITVLM_RX_STORE): memory (one process) or redis"
    )
    store_redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis URL for store=redis (SPLITVLM_RX_STORE_REDIS_URL); bound its memory on the "
        "server: maxmemory + maxmemory-policy allkeys-lru",
    )
    store_max_bytes: int = Field(
        256 * 2**20,
        gt=0,
        description="memory store: bound of stored packets, LRU (SPLITVLM_RX_STORE_MAX_BYTES)",
    )
    store_ttl_s: float = Field(
        3600.0,
        ge=0,
        description="stored packets expire after this many seconds; 0 never (SPLITVLM_RX_STORE_TTL_S)",
    )
    store_frames_per_stream: int = Field(
        64, gt=0, description="last N frames kept per stream (SPLITVLM_RX_STORE_FRAMES_PER_STREAM)"
    )
    kv_cache_bytes: int = Field(
        256 * 2**20,
        ge=0,
        description="bound of the image-prefix KV cache for questions about stored features; 0 disables "
        "(SPLITVLM_RX_KV_CACHE_BYTES)",
    )

    max_publish_streams: int = Field(
        2,
        gt=0,
        description="Publish streams served at once; each holds a gRPC worker, so keep it under "
        "grpc_workers (SPLITVLM_RX_MAX_PUBLISH_STREAMS)",
    )

    def packet_limits(self) -> PacketLimits:
        return PacketLimits(
            max_packet_bytes=self.max_packet_bytes,
            max_tokens=self.max_tokens,
            max_decoded_bytes=self.max_decoded_bytes,
        )


class TxSettings(BaseSettings):
    """The edge side: image processor + vision encoder + codec."""

    model_config = SettingsConfigDict(env_prefix="SPLITVLM_TX_", extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="hub id, local folder or builtin:NAME")
    split_point: SplitPoint = SplitPoint.AFTER_VISION_TOWER
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    rx_address: str = Field("127.0.0.1:50061", description="HOST:PORT of the Rx gRPC server")
    codec: str = Field("int8", description="default codec preset or spec")
    codec_artifacts: list[Path] = Field(
        default_factory=list,
        description="calibration artifacts (splitvlm calibrate), matched to calibrated codec specs",
    )
    max_image_bytes: int = Field(20 * 2**20, gt=0)
    max_image_pixels: int = Field(50_000_000, gt=0)
    max_prompt_chars: int = Field(8_192, gt=0)
    chunk_bytes: int = Field(256 * 1024, gt=0, description="payload bytes per gRPC message")
    rx_timeout_s: float = Field(300.0, gt=0)
    cache_bytes: int = Field(
        64 * 2**20,
        ge=0,
        description="bound of the packet cache (image hash + fingerprints -> packet); 0 disables",
    )
    grpc_workers: int = Field(4, gt=0)
    cache_dir: Path = Field(default_factory=default_cache_dir)
    log_level: LogLevel = Field("info", description="log level; info logs one access line per request")
    log_json: bool = Field(False, description="log one JSON object per line (for log shippers)")
    metrics_port: int = Field(
        8051, ge=0, le=65535, description="HTTP port of the Prometheus /metrics endpoint (0: any free port)"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return _sources(settings_cls, init_settings, dotenv_settings, file_secret_settings)

    # ---- edge HTTP (OpenAI-compatible) and push mode (issue 13) ----
    http_enabled: bool = Field(
        False, description="serve the OpenAI-compatible HTTP API (SPLITVLM_TX_HTTP_ENABLED); off by default"
    )
    http_port: int = Field(8052, ge=0, le=65535, description="HTTP API port (SPLITVLM_TX_HTTP_PORT)")
    http_file_roots: list[Path] = Field(
        default_factory=list,
        description="folders whose images `file://` URLs may name (SPLITVLM_TX_HTTP_FILE_ROOTS, JSON list); "
        "empty refuses file:// URLs",
    )
    stream_window: int = Field(
        4,
        gt=0,
        description="push mode: most frames sent and not yet acknowledged (SPLITVLM_TX_STREAM_WINDOW)",
    )
