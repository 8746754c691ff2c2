"""Schema fuzzing of the Rx HTTP API (schemathesis): requests generated from the served OpenAPI
document, valid and invalid, never get a 5xx, and the server keeps answering."""

from __future__ import annotations

from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings

EXAMPLES_PER_OPERATION = 12


def test_rx_http_api_answers_generated_requests_without_server_errors(rx: Any) -> None:
    schema = schemathesis.openapi.from_url(rx.http_url + "/openapi.json")
    seen: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        seen.append(f"{operation.method.upper()} {operation.path}")

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            response = case.call(timeout=60)
            assert response.status_code < 500, (
                case.method,
                case.path,
                response.status_code,
                response.text[:300],
            )

        check()
    assert "POST /v1/generate" in seen and "POST /v1/chat/completions" in seen, seen
    assert httpx.get(rx.http_url + "/healthz", timeout=10).status_code == 200  # still serving


def test_openapi_declares_metrics_as_prometheus_text(rx: Any) -> None:
    spec = httpx.get(rx.http_url + "/openapi.json", timeout=10).json()
    content = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "application/json" not in content and any(t.startswith("text/plain") for t in content)
    assert "multipart/form-data" in spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]
