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
from shared.reference.scenes import COLORS, SHAPES, make_scene, object_coverage, tokenize
from shared.reference.train import (
    IGNORE,
    Batcher,
    SceneGrid,
    TrainConfig,
    evidence,
    forward_loss,
    grounding_targets,
    named_objects,
    train,
    word_targets,
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
        loss = forward_loss(model, batcher, pixels, ids, labels, mask, index).loss
        full = model(
            input_ids=torch.cat([prefix, ids], 1),
            pixel_values=pixels[index],
            attention_mask=torch.cat([torch.ones_like(prefix), mask], 1),
            labels=torch.cat([torch.full_like(prefix, IGNORE), labels], 1),
        )
    assert math.isclose(float(loss), float(full.loss), rel_tol=1e-5)


def test_object_coverage_is_a_share_of_each_cell_and_fits_the_shape_area() -> None:
    for seed in range(8):
        scene = make_scene(seed)
        cover = object_coverage(scene.objects, 128, 16)
        assert cover.shape == (len(scene.objects), 256)
        assert float(cover.min()) >= 0.0 and float(cover.max()) <= 1.0
        for k, obj in enumerate(scene.objects):
            area = float(cover[k].sum()) * 64  # cells of 8x8 px
            if obj.shape == "circle":
                assert math.isclose(area, math.pi * obj.radius**2, rel_tol=0.15)
            assert area > 0.2 * math.pi * obj.radius**2  # every shape fills a fair share of its circle


def test_patch_targets_label_each_object_and_its_centre() -> None:
    grid = SceneGrid(128, 16)
    scenes = [make_scene(seed) for seed in range(10)]
    t = grid.targets(scenes)
    for i, scene in enumerate(scenes):
        assert int(t.centres[i].sum()) == len(scene.objects)
        for k, obj in enumerate(scene.objects):
            centre = grid.centre(scene, k)
            assert t.centres[i, centre] == 1.0
            owned = grid.owners(scene) == k
            assert bool(owned.any())  # even a small object owns at least one patch
            assert bool((t.colors[i, owned] == COLORS.index(obj.color) + 1).all())
            assert bool((t.shapes[i, owned] == SHAPES.index(obj.shape) + 1).all())
            assert torch.allclose(t.where[i, owned], torch.tensor([obj.cx / 128, obj.cy / 128]))
        assert bool((t.colors[i] > 0).sum() < 256 // 2)  # background dominates


def test_grounding_targets_cover_the_named_objects() -> None:
    grid = SceneGrid(128, 16)
    for seed in range(20):
        scene = make_scene(seed)
        targets, sink = grounding_targets(grid, [scene])
        assert targets.shape == (len(scene.qas), 1, 256)
        owner = grid.owners(scene)
        for heads, may_sink, qa in zip(targets, sink, scene.qas, strict=True):
            row, picked = heads[0], evidence(scene, qa)
            assert bool(may_sink) == (qa.qtype == "count" or (qa.qtype == "presence" and not picked))
            if qa.qtype == "count":  # one patch per counted object: its centre
                assert sorted(row.nonzero().flatten().tolist()) == sorted(
                    grid.centre(scene, k) for k in picked
                )
                continue
            assert bool(row.any()) == bool(picked)
            for k in picked:
                assert bool((row | (owner != k)).all())  # every patch of an evidence object is a target
                obj = scene.objects[k]
                assert obj.color in qa.question or obj.shape in qa.question


def test_relative_questions_ground_first_named_object_on_half_the_heads() -> None:
    grid = SceneGrid(128, 16)
    checked = 0
    for seed in range(40):
        scene = make_scene(seed)
        targets, _ = grounding_targets(grid, [scene], heads=6)
        owner = grid.owners(scene)
        for heads, qa in zip(targets, scene.qas, strict=True):
            if qa.qtype != "relative":
                assert bool((heads == heads[0]).all())  # one target shared by every head
                continue
            a, b = named_objects(scene, qa)
            first, second = scene.objects[a], scene.objects[b]
            assert qa.question.index(f"{first.color} {first.shape}") < qa.question.index(
                f"{second.color} {second.shape}"
            )
            assert bool((heads[:3] == (owner == a)).all()) and bool((heads[3:] == (owner == b)).all())
            checked += 1
    assert checked > 5


def test_training_smoke_run_saves_a_loadable_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig(
        vision_steps=2,
        vision_images_per_step=2,
        steps=2,
        images_per_step=2,
        questions_per_image=2,
        warmup=1,
        log_every=1,
    )
    model, processor = train(cfg, log_path=tmp_path / "log.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [
        ("vision", 1),
        ("vision", 2),
        ("language", 1),
        ("language", 2),
    ]
    assert all(math.isfinite(r["patch_loss"]) for r in rows[:2])
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["ground_loss"]) for r in rows[2:])
    assert all(p.requires_grad for p in model.parameters())  # stage 2's freeze is undone
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


def test_word_targets_point_the_first_layer_at_the_question_names() -> None:
    model, processor = new_reference_model(0)
    batcher = Batcher(processor, int(model.config.image_token_index), int(model.config.image_seq_length))
    qas = [qa for seed in range(30) for qa in make_scene(seed).qas]
    ids, _, _ = batcher.suffixes(qas)
    targets = word_targets(batcher, qas, heads=6, width=ids.shape[1])
    vocab = processor.tokenizer
    for qa, row, heads in zip(qas, ids, targets, strict=True):
        named = [vocab.decode([int(t)]).strip() for t in row[heads.any(0)]]
        expected = [w for w in tokenize(qa.question) if w in COLORS or w in SHAPES or w.rstrip("s") in SHAPES]
        assert named == expected, qa.question
        if qa.qtype == "relative":  # first-named object on heads 0-2, second on heads 3-5
            assert [vocab.decode([int(t)]).strip() for t in row[heads[0]]] == expected[:2]
            assert [vocab.decode([int(t)]).strip() for t in row[heads[5]]] == expected[2:]
        else:
            assert bool((heads == heads[0]).all())
