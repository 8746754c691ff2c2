"""Operators' view of the services: access log lines, JSON logs, /metrics on both, offline /docs."""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Any

import httpx
import pytest

from shared.logs import ACCESS_LOGGER, log_access, setup_logging
from tx_service.client import TxClient


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_one_access_line_per_request_on_both_services(
    tx: Any, images: list, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER), TxClient(tx.address) as client:
        answer = client.ask(images[0], "What is it?", codec="int8", max_new_tokens=3, request_id="req-ops-1")
    lines = [
        r for r in caplog.records if r.name == ACCESS_LOGGER and getattr(r, "request_id", "") == "req-ops-1"
    ]
    by_service = {(r.service, r.method): r for r in lines}  # type: ignore[attr-defined]
    assert set(by_service) == {("tx", "Ask"), ("rx", "Generate")}, [r.getMessage() for r in lines]
    for record in by_service.values():
        fields: Any = record
        assert record.levelno == logging.INFO and fields.status == "OK"
        assert fields.bytes_in > 0 and fields.bytes_out > 0 and fields.ms > 0
        assert fields.tokens == len(answer.token_ids) and fields.ttft_ms > 0
        assert "id=req-ops-1" in record.getMessage()
    rx_line: Any = by_service["rx", "Generate"]
    assert rx_line.bytes_in >= answer.payload_bytes


def test_refused_requests_are_logged_with_their_status(
    tx: Any, images: list, caplog: pytest.LogCaptureFixture
) -> None:
    from shared.errors import RemoteError

    with (
        caplog.at_level(logging.INFO, logger=ACCESS_LOGGER),
        TxClient(tx.address) as client,
        pytest.raises(RemoteError),
    ):
        client.ask(images[0], "   ", request_id="req-ops-bad")
    (record,) = [r for r in caplog.records if getattr(r, "request_id", "") == "req-ops-bad"]
    assert record.status == "INVALID_ARGUMENT"  # type: ignore[attr-defined]


def test_json_log_lines_carry_the_access_fields() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        setup_logging("info", json_lines=True)
        stream = io.StringIO()
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        log_access("rx", "Generate", "OK", bytes_in=10, bytes_out=20, ms=3.0, request_id="r1", tokens=2)
        record = json.loads(stream.getvalue().strip().splitlines()[-1])
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)
    assert record["level"] == "INFO" and record["logger"] == ACCESS_LOGGER
    assert {
        k: record[k] for k in ("service", "method", "status", "bytes_in", "bytes_out", "request_id", "tokens")
    } == {
        "service": "rx",
        "method": "Generate",
        "status": "OK",
        "bytes_in": 10,
        "bytes_out": 20,
        "request_id": "r1",
        "tokens": 2,
    }


def test_log_settings_come_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.config import RxSettings, TxSettings

    monkeypatch.setenv("SPLITVLM_RX_LOG_LEVEL", "debug")
    monkeypatch.setenv("SPLITVLM_TX_LOG_JSON", "1")
    assert RxSettings().log_level == "debug" and TxSettings().log_json is True


def test_tx_serves_metrics_and_both_count_requests_tokens_ttft_and_cache(
    tx: Any, rx: Any, images: list
) -> None:
    assert tx.metrics is not None and tx.metrics_url
    before = httpx.get(tx.metrics_url, timeout=60).text
    with TxClient(tx.address) as client:
        client.ask(images[1], "Again?", codec="fp16", max_new_tokens=3)
        again = client.ask(images[1], "Again?", codec="fp16", max_new_tokens=3)
    assert again.cache_hit
    after = httpx.get(tx.metrics_url, timeout=60).text
    rx_metrics = httpx.get(f"{rx.http_url}/metrics", timeout=60).text
    for text in (after, rx_metrics):  # one process: the same registry behind both endpoints
        assert "splitvlm_queue_depth" in text and "splitvlm_requests_in_flight" in text

    def grew(name: str, **labels: str) -> float:
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert grew("splitvlm_requests_total", service="tx", method="Ask", code="OK") == 2
    assert grew("splitvlm_requests_total", service="rx", method="Generate", code="OK") == 2
    assert grew("splitvlm_tokens_generated_total", service="tx") == len(again.token_ids) * 2
    assert grew("splitvlm_time_to_first_token_seconds_count", service="rx") == 2
    assert grew("splitvlm_payload_bytes_count", service="tx") == 2
    assert grew("splitvlm_cache_events_total", event="hit") == 1
    assert _metric(after, "splitvlm_queue_depth", service="rx") == 0


def test_rx_http_requests_get_an_id_and_an_access_line(rx: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        resp = httpx.get(f"{rx.http_url}/v1/info", headers={"X-Request-Id": "http-ops-1"}, timeout=60)
    assert resp.headers["x-request-id"] == "http-ops-1"
    (record,) = [r for r in caplog.records if getattr(r, "request_id", "") == "http-ops-1"]
    fields: Any = record
    assert (
        fields.method == "GET /v1/info" and fields.status == "200" and fields.bytes_out == len(resp.content)
    )


def test_docs_load_nothing_from_outside(rx: Any) -> None:
    for page in ("/docs", "/redoc"):
        html = httpx.get(rx.http_url + page, timeout=60).text
        urls = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert urls, html
        assert not [u for u in urls if re.match(r"(https?:)?//", u)], urls
        scripts = [u for u in urls if u.endswith(".js")]
        assert scripts
        for url in scripts:
            resp = httpx.get(rx.http_url + url, timeout=60)
            assert resp.status_code == 200 and "javascript" in resp.headers["content-type"]
            assert len(resp.content) > 100_000  # the real bundle, not a placeholder
    assert httpx.get(rx.http_url + "/openapi.json", timeout=60).json()["info"]["title"] == "splitvlm Rx"
