"""What a checkpoint says about itself to users (e.g. that its weights are random)."""

from __future__ import annotations

import json
from pathlib import Path

NOTICE_FILE = "splitvlm.json"


def model_notice(folder: Path) -> str:
    """The `notice` string from `<folder>/splitvlm.json`, or "" when there is none."""
    path = Path(folder) / NOTICE_FILE
    if not path.is_file():
        return ""
    try:
        return str(json.loads(path.read_text()).get("notice", ""))
    except (OSError, ValueError):
        return ""
