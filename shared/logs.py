"""Logging for both services: text or JSON lines, and one access line per request.

The access line (logger ``splitvlm.access``, level info) carries method, status, bytes in
and out, time to first token, total time and the request id; as text it reads
``rx Generate OK in=4293B out=57B ttft_ms=12.0 ms=80.1 tokens=8 id=…``, with
``--log-json`` each of those is a key of the JSON object.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

ACCESS_LOGGER = "splitvlm.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

access_log = logging.getLogger(ACCESS_LOGGER)


def setup_logging(level: str = "warning", json_lines: bool = False) -> None:
    """Configure the root logger once per process: level, and text or JSON lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def log_access(
    service: str,
    method: str,
    status: str,
    *,
    bytes_in: int,
    bytes_out: int,
    ms: float,
    request_id: str = "",
    ttft_ms: float | None = None,
    tokens: int | None = None,
    **extra: Any,
) -> None:
    """One info line for one finished request (also for refused ones)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {
        "service": service,
        "method": method,
        "status": status,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "ms": round(ms, 1),
        "request_id": request_id,
    }
    if ttft_ms is not None:
        fields["ttft_ms"] = round(ttft_ms, 1)
    if tokens is not None:
        fields["tokens"] = tokens
    fields.update(extra)
    text = f"{service} {method} {status} in={bytes_in}B out={bytes_out}B"
    if ttft_ms is not None:
        text += f" ttft_ms={ttft_ms:.1f}"
    text += f" ms={ms:.1f}"
    if tokens is not None:
        text += f" tokens={tokens}"
    text += "".join(f" {k}={v}" for k, v in extra.items())
    text += f" id={request_id or '-'}"
    access_log.info(text, extra=fields)


def served_info(service: str, info_of: Any, request: Any) -> Any:
    """Answer an Info call with `info_of()`, counted and access-logged like every other call."""
    import time

    from shared.metrics import REQUESTS

    started = time.perf_counter()
    REQUESTS.labels(service, "Info", "OK").inc()
    info = info_of()
    log_access(
        service,
        "Info",
        "OK",
        bytes_in=request.ByteSize(),
        bytes_out=info.ByteSize(),
        ms=(time.perf_counter() - started) * 1e3,
    )
    return info
