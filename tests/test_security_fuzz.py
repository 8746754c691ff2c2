"""Bounded packet/request fuzzing over gRPC and HTTP (issue 12; `scripts/fuzz_packets.py --long`
runs the 100,000-case version). No INTERNAL/UNKNOWN, no 5xx, no hang, and the Rx answers a
valid request afterwards."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_packets.py"
_spec = importlib.util.spec_from_file_location("fuzz_packets", _SCRIPT)
assert _spec is not None and _spec.loader is not None
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_packets"] = fuzz  # dataclasses look their module up while the class is built
_spec.loader.exec_module(fuzz)


def test_fuzzed_packets_get_client_errors_never_server_errors(rx: Any, tx: Any, images: list) -> None:
    encoded = tx.engine.encode(images[0], "int8")
    # ~20 s on 2 busy cores: a bound on time as well as on cases keeps the suite's runtime fixed.
    report = fuzz.run(
        rx.grpc_address, rx.http_url, encoded.header, encoded.payload, 3000, seed=12, max_seconds=20
    )
    print(fuzz.summary(report))
    assert report.cases >= 200, fuzz.summary(report)
    assert report.ok(), fuzz.summary(report)
    # The mutations reach the interesting checks, not just the parser.
    codes = set(report.grpc_codes)
    assert {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "OK"} <= codes, codes
    assert any(400 <= status < 500 for status in report.http_codes), report.http_codes
