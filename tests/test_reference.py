"""The shipped reference model: loads like a hub checkpoint, split == unsplit, training code path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from shared.models.registry import resolve_model
from shared.reference.evaluate import evaluate_split, evaluate_unsplit, heldout_items
from shared.reference.model import TOKENS_PER_IMAGE, new_reference_model, save_reference_model
from shared.reference.scenes import QTYPES, make_scene
from shared.reference.train import IGNORE, Batcher, TrainConfig, forward_loss, train
from shared.split import SplitPoint, load_tx_half

REF = "builtin:reference-llava"


@pytest.fixture(scope="module")
def ref_dir() -> Path:
    return resolve_model(REF)


@pytest.fixture(scope="module")
def subset() -> list:
    return heldout_items(n_images=40)


@pytest.fixture(scope="module")
def unsplit_result(ref_dir: Path, subset: list):  # type: ignore[no-untyped-def]
    return evaluate_unsplit(ref_dir, subset)


def test_shipped_checkpoint_loads_like_a_hub_checkpoint(ref_dir: Path) -> None:
    weights = sum(f.stat().st_size for f in ref_dir.glob("*.safetensors"))
    assert weights <= 20 * 2**20
    processor = AutoProcessor.from_pretrained(ref_dir)
    model = LlavaForConditionalGeneration.from_pretrained(ref_dir)
    assert model.config.image_seq_length >= 256 and processor.tokenizer.image_token == "<image>"
    tx = load_tx_half(ref_dir)
    features = tx.encode(tx.preprocess([make_scene(10_000_000).image]))
    assert features.features.shape == (TOKENS_PER_IMAGE, model.config.vision_config.hidden_size)
    card = (ref_dir / "README.md").read_text()
    assert "splitvlm train-reference" in card and "overall" in card


def test_recorded_scores_meet_the_bar(ref_dir: Path) -> None:
    """The model card's numbers come from `splitvlm train-reference`'s own held-out evaluation."""
    recorded = json.loads((ref_dir / "splitvlm.json").read_text())["heldout"]
    assert recorded["n"] == 600 and recorded["accuracy"] >= 0.90
    assert set(recorded["per_type"]) == set(QTYPES) and min(recorded["per_type"].values()) >= 0.80


def test_unsplit_accuracy_on_a_heldout_subset(unsplit_result) -> None:  # type: ignore[no-untyped-def]
    # 80 questions: a regression guard, looser than the full-set bar because of the small sample.
    assert unsplit_result.accuracy >= 0.85, unsplit_result.to_dict()


def test_lossless_split_gives_the_unsplit_answers(ref_dir: Path, subset: list, unsplit_result) -> None:  # type: ignore[no-untyped-def]
    split = evaluate_split(ref_dir, subset, "lossless")
    assert split.answers == unsplit_result.answers
    assert split.payload_bytes and min(split.payload_bytes) > 0


def test_split_after_projector_gives_the_unsplit_answers(ref_dir: Path, subset: list, unsplit_result) -> None:  # type: ignore[no-untyped-def]
    split = evaluate_split(ref_dir, subset[:20], "lossless", SplitPoint.AFTER_PROJECTOR)
    assert split.answers == unsplit_result.answers[:20]


def test_prefix_shared_training_loss_equals_full_sequence_loss() -> None:
    model, processor = new_reference_model(seed=3)
    model.eval()
    batcher = Batcher(processor, int(model.config.image_token_index), int(model.config.image_seq_length))
    scenes = [make_scene(seed) for seed in (1, 2)]
    qas = [qa for s in scenes for qa in s.qas]
    index = torch.tensor([i for i, s in enumerate(scenes) for _ in s.qas])
    pixels = batcher.pixels([s.image for s in scenes])
    ids, labels, mask = batcher.suffixes(qas)
    prefix = torch.tensor(batcher.prefix_ids).expand(len(qas), -1)
    with torch.no_grad():
        loss, _, _ = forward_loss(model, batcher, pixels, ids, labels, mask, index)
        full = model(
            input_ids=torch.cat([prefix, ids], 1),
            pixel_values=pixels[index],
            attention_mask=torch.cat([torch.ones_like(prefix), mask], 1),
            labels=torch.cat([torch.full_like(prefix, IGNORE), labels], 1),
        )
    assert math.isclose(float(loss), float(full.loss), rel_tol=1e-5)


def test_training_smoke_run_saves_a_loadable_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=2, images_per_step=2, questions_per_image=2, warmup=1, log_every=1)
    model, processor = train(cfg, log_path=tmp_path / "log.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    out = save_reference_model(model, processor, tmp_path / "ckpt", card="# test", meta={"notice": ""})
    assert LlavaForConditionalGeneration.from_pretrained(out).config.image_seq_length == TOKENS_PER_IMAGE
