"""A short load test (issue 12; `scripts/load_test.py` runs 32 clients x 10 minutes):
8 concurrent clients through Tx → Rx, every answer complete and equal to the answer the
same question gets alone, no errors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "load_test.py"
_spec = importlib.util.spec_from_file_location("load_test", _SCRIPT)
assert _spec is not None and _spec.loader is not None
load_test = importlib.util.module_from_spec(_spec)
sys.modules["load_test"] = load_test
_spec.loader.exec_module(load_test)


def test_eight_concurrent_clients_get_every_answer_right(tx: Any) -> None:
    report = load_test.run_load(
        tx.address, clients=8, requests_per_client=3, max_new_tokens=6, sample_rss=False
    )
    print(report.summary())
    assert report.answers == 8 * 3, report.summary()
    assert not report.errors and report.wrong == 0, report.summary()
