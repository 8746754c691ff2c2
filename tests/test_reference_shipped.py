"""The shipped reference model: its weights are the ones its card names, and it still answers."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from shared.models.registry import DEFAULT_MODEL, SHIPPED_MODELS, resolve_model

REFERENCE = "builtin:reference-llava"
FOLDER = SHIPPED_MODELS[REFERENCE]
# The card reports ~94 % on all 600 held-out questions. A checkpoint whose weights were damaged
# or whose tower and language model do not belong together scores near chance (~30 %).
FLOOR = 0.80


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_reference_model_is_the_default_and_resolves() -> None:
    assert DEFAULT_MODEL == REFERENCE
    assert resolve_model(REFERENCE) == FOLDER


def test_shipped_weights_match_the_model_card() -> None:
    card = (FOLDER / "README.md").read_text()
    stated = re.search(r"`model\.safetensors`, sha256 `([0-9a-f]{64})`", card)
    assert stated, "the model card must state the weights' sha256"
    assert _sha256(FOLDER / "model.safetensors") == stated.group(1)
    meta = json.loads((FOLDER / "splitvlm.json").read_text())
    assert meta["weights_sha256"] == stated.group(1)
    assert (FOLDER / "model.safetensors").stat().st_size <= 20 * 2**20


def test_shipped_model_scores_on_a_heldout_subset() -> None:
    from shared.reference.evaluate import evaluate_unsplit, heldout_items

    items = heldout_items(n_images=20, per_image=2)  # 40 questions
    result = evaluate_unsplit(FOLDER, items)
    assert result.accuracy >= FLOOR, (result.accuracy, result.per_type())
