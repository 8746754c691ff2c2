"""Reference-model tooling: training loss equivalence, a training smoke run, held-out evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from shared.models.registry import resolve_model
from shared.reference.evaluate import evaluate_split, evaluate_unsplit, heldout_items
from shared.reference.model import TOKENS_PER_IMAGE, new_reference_model, save_reference_model
from shared.reference.scenes import make_scene
from shared.reference.train import (
    IGNORE,
    Batcher,
    PatchLabels,
    TrainConfig,
    evidence,
    forward_loss,
    grounding_targets,
    train,
)
from shared.split import SplitPoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_model("builtin:tiny-llava", tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def subset() -> list:
    return heldout_items(n_images=10)


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
        loss, _, _, _ = forward_loss(model, batcher, pixels, ids, labels, mask, index)
        full = model(
            input_ids=torch.cat([prefix, ids], 1),
            pixel_values=pixels[index],
            attention_mask=torch.cat([torch.ones_like(prefix), mask], 1),
            labels=torch.cat([torch.full_like(prefix, IGNORE), labels], 1),
        )
    assert math.isclose(float(loss), float(full.loss), rel_tol=1e-5)


def test_question_first_training_loss_equals_the_model_forward_loss() -> None:
    model, processor = new_reference_model(seed=4, question_first=True)
    model.eval()
    batcher = Batcher(processor, int(model.config.image_token_index), int(model.config.image_seq_length))
    assert not batcher.shared_prefix
    scenes = [make_scene(seed) for seed in (5, 6)]
    qas = [qa for s in scenes for qa in s.qas]
    index = torch.tensor([i for i, s in enumerate(scenes) for _ in s.qas])
    pixels = batcher.pixels([s.image for s in scenes])
    ids, labels, mask = batcher.full(qas)
    with torch.no_grad():
        loss, _, _, _ = forward_loss(model, batcher, pixels, ids, labels, mask, index)
        full = model(input_ids=ids, pixel_values=pixels[index], attention_mask=mask, labels=labels)
    assert math.isclose(float(loss), float(full.loss), rel_tol=1e-5)


def test_grounding_targets_cover_the_named_objects() -> None:
    labels = PatchLabels(grid=16, patch=8)
    for seed in range(20):
        scene = make_scene(seed)
        targets = grounding_targets(labels, [scene])
        masks = labels.object_masks(scene)
        for row, qa in zip(targets, scene.qas, strict=True):
            picked = evidence(scene, qa)
            assert bool(row.any()) == bool(picked)
            for k in picked:
                assert bool((row | ~masks[k]).all())  # every patch of an evidence object is a target
                obj = scene.objects[k]
                named = (obj.color in qa.question) or (obj.shape in qa.question)
                assert named or qa.question == "how many objects are there?"


def test_training_smoke_run_saves_a_loadable_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=2, images_per_step=2, questions_per_image=2, warmup=1, log_every=1)
    model, processor = train(cfg, log_path=tmp_path / "log.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    out = save_reference_model(model, processor, tmp_path / "ckpt", card="# test", meta={"notice": ""})
    loaded = LlavaForConditionalGeneration.from_pretrained(out)
    assert loaded.config.image_seq_length == TOKENS_PER_IMAGE
    assert loaded.config._attn_implementation != "eager"  # training's eager attention is not saved


def test_lossless_split_gives_the_unsplit_answers_on_heldout_items(tiny_dir: Path, subset: list) -> None:
    unsplit = evaluate_unsplit(tiny_dir, subset)
    split = evaluate_split(tiny_dir, subset, "lossless")
    after_projector = evaluate_split(tiny_dir, subset, "lossless", SplitPoint.AFTER_PROJECTOR)
    assert len(set(unsplit.answers)) > 1  # the answers depend on the input
    assert split.answers == unsplit.answers == after_projector.answers
    assert split.payload_bytes and min(split.payload_bytes) > 0
    assert set(unsplit.per_type()) and 0.0 <= unsplit.accuracy <= 1.0
