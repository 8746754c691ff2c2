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


class _Settings(BaseSettings):
    """Both services' settings: list settings also read ``a,b,c`` from the environment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _CommaListEnv(settings_cls), dotenv_settings, file_secret_settings)


class RxSettings(_Settings):
    """The server side: connector + language model."""

    model_config = SettingsConfigDict(env_prefix="SPLITVLM_RX_", extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="hub id, local folder or builtin:NAME")
    split_point: SplitPoint = Field(SplitPoint.AFTER_VISION_TOWER, description="where the model is cut")
    host: str = Field("127.0.0.1", description="bind address (non-loopback without TLS/token: loud warning)")
    grpc_port: int = Field(50061, ge=0, le=65535, description="gRPC port (0: any free port)")
    http_port: int = Field(8061, ge=0, le=65535, description="HTTP port (0: any free port)")
    codecs: list[str] = Field(
        default_factory=lambda: ["lossless", "fp16", "int8", "balanced", "tiny", "ladder"],
        description="codecs this Rx accepts (others are refused, FAILED_PRECONDITION / 409): presets, "
        "specs, 'ladder' (the Tx's rate-control ladder) or 'any' (every calibration-free codec); "
        "calibrated codecs are accepted when their artifact is loaded",
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
    max_packet_bytes: int = Field(
        64 * 2**20, gt=0, description="largest packet payload (413 / RESOURCE_EXHAUSTED)"
    )
    max_tokens: int = Field(65_536, gt=0, description="most visual tokens one packet may declare")
    max_decoded_bytes: int = Field(
        512 * 2**20, gt=0, description="largest decoded feature tensor a packet may declare"
    )
    max_prompt_chars: int = Field(8_192, gt=0, description="longest prompt (the model's context applies too)")
    default_max_new_tokens: int = Field(32, gt=0, description="max_new_tokens when a request gives none")
    max_new_tokens_limit: int = Field(512, gt=0, description="largest max_new_tokens a request may ask")
    grpc_workers: int = Field(
        32, gt=0, description="gRPC server threads (and most concurrent calls; more get RESOURCE_EXHAUSTED)"
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir, description="model cache (SPLITVLM_CACHE_DIR, ~/.cache/splitvlm)"
    )
    # ---- transport security and authentication (shared/security.py) ----
    tls_cert: Path | None = Field(None, description="PEM server certificate: TLS on gRPC and HTTP")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA: require gRPC clients (the Tx) to present a certificate it signed (mTLS)"
    )
    auth_token: str | None = Field(
        None, description="bearer token clients must send (gRPC `authorization` metadata, HTTP header)"
    )
    auth_token_file: Path | None = Field(
        None, description="file of accepted bearer tokens, one per line; re-read when it changes"
    )
    public_paths: list[str] = Field(
        default_factory=list,
        description="HTTP paths open without a token besides /healthz and /readyz (e.g. /metrics, /docs)",
    )
    # ---- bounded work (rx_service/stream_reader.py, rx_service/admission.py) ----
    stream_idle_timeout_s: float = Field(
        10.0, gt=0, description="gRPC Generate: longest pause between a request's messages"
    )
    upload_timeout_s: float = Field(60.0, gt=0, description="longest time to receive a whole request")
    http_keepalive_s: float = Field(
        5.0, gt=0, description="HTTP: idle keep-alive connections close after this"
    )
    http_header_timeout_s: float = Field(10.0, gt=0, description="HTTP: longest time to send request headers")
    http_body_timeout_s: float = Field(
        30.0, gt=0, description="HTTP: longest pause while sending a request body (408 after it)"
    )
    max_concurrent_requests: int = Field(1, gt=0, description="requests generating at once")
    max_queued_requests: int = Field(
        32, ge=0, description="requests waiting for a generation slot; more get RESOURCE_EXHAUSTED / 429"
    )
    queue_timeout_s: float = Field(
        60.0, gt=0, description="longest wait for a generation slot before RESOURCE_EXHAUSTED / 429"
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="per-request deadline on the server (queue + generation)"
    )

    log_level: LogLevel = Field("info", description="log level; info logs one access line per request")
    log_json: bool = Field(False, description="log one JSON object per line (for log shippers)")

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


class TxSettings(_Settings):
    """The edge side: image processor + vision encoder + codec."""

    model_config = SettingsConfigDict(env_prefix="SPLITVLM_TX_", extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="hub id, local folder or builtin:NAME")
    split_point: SplitPoint = Field(SplitPoint.AFTER_VISION_TOWER, description="where the model is cut")
    host: str = Field("127.0.0.1", description="bind address (non-loopback without TLS/token: loud warning)")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free port)")
    rx_address: str = Field("127.0.0.1:50061", description="HOST:PORT of the Rx gRPC server")
    codec: str = Field("int8", description="default codec preset or spec")
    codec_artifacts: list[Path] = Field(
        default_factory=list,
        description="calibration artifacts (splitvlm calibrate), matched to calibrated codec specs",
    )
    max_image_bytes: int = Field(20 * 2**20, gt=0, description="largest image upload")
    max_image_pixels: int = Field(
        4096 * 4096,
        gt=0,
        description="largest image (width x height) the Tx decodes; checked from the header",
    )
    max_prompt_chars: int = Field(8_192, gt=0, description="longest prompt")
    chunk_bytes: int = Field(256 * 1024, gt=0, description="payload bytes per gRPC message")
    rx_timeout_s: float = Field(300.0, gt=0, description="deadline of one call to the Rx")
    cache_bytes: int = Field(
        64 * 2**20,
        ge=0,
        description="bound of the packet cache (image hash + fingerprints -> packet); 0 disables",
    )
    grpc_workers: int = Field(32, gt=0, description="gRPC server threads (and most concurrent calls)")
    cache_dir: Path = Field(
        default_factory=default_cache_dir, description="model cache (SPLITVLM_CACHE_DIR, ~/.cache/splitvlm)"
    )
    # ---- transport security and authentication (shared/security.py) ----
    tls_cert: Path | None = Field(
        None, description="PEM certificate: TLS on the Tx listener, and the client certificate for Rx mTLS"
    )
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_ca: Path | None = Field(None, description="PEM CA that signed the Rx's certificate: TLS to the Rx")
    auth_token: str | None = Field(None, description="bearer token clients of this Tx must send")
    auth_token_file: Path | None = Field(
        None, description="file of bearer tokens this Tx accepts, one per line; re-read when it changes"
    )
    rx_auth_token: str | None = Field(None, description="bearer token the Tx sends to the Rx")
    rx_auth_token_file: Path | None = Field(None, description="file holding the token the Tx sends to the Rx")
    rx_retry_budget_s: float = Field(
        10.0,
        ge=0,
        description="retry an Rx call that is UNAVAILABLE before its first answer chunk for this long "
        "(exponential backoff with jitter)",
    )
    log_level: LogLevel = Field("info", description="log level; info logs one access line per request")
    log_json: bool = Field(False, description="log one JSON object per line (for log shippers)")
    metrics_port: int = Field(
        8051, ge=0, le=65535, description="HTTP port of the Prometheus /metrics endpoint (0: any free port)"
    )

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
