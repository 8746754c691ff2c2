"""The synthetic VQA scenes: reproducible, geometrically valid, and every answer right by construction.

Answers are recomputed here from the object list with an independent parser of the question text, so a
bug in the generator's question logic cannot hide behind the same bug in the check.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")

from shared.reference.scenes import (
    COLOR_RGB,
    COLORS,
    QA,
    QTYPES,
    SHAPES,
    SceneObject,
    heldout_seeds,
    heldout_set,
    make_scene,
    render,
    training_seeds,
    vocabulary,
    write_image_folder,
)

SEEDS = range(300)
NUMBERS = ["zero", "one", "two", "three", "four"]


@pytest.fixture(scope="module")
def scenes() -> list:
    return [make_scene(seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def heldout() -> list[tuple]:
    return heldout_set()


def _find(objects: list[SceneObject], color: str, shape: str) -> SceneObject:
    found = [o for o in objects if o.color == color and o.shape == shape]
    assert len(found) == 1, f"{color} {shape} must name exactly one object; found {found}"
    return found[0]


def expected(question: str, objects: list[SceneObject], size: int) -> tuple[str, str, bool]:
    """(answer, qtype, small_object) for a question, from the objects alone."""
    middle, clear = size / 2, 12 * size / 128
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (obj,) = [o for o in objects if o.shape == m[1]]  # exactly one: the question is unambiguous
        return obj.color, "color", obj.size == "small"
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (obj,) = [o for o in objects if o.color == m[1]]
        return obj.shape, "shape", obj.size == "small"
    if question == "how many objects are there?":
        return NUMBERS[len(objects)], "count", any(o.size == "small" for o in objects)
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        counted = [o for o in objects if o.shape == m[1]]
        return NUMBERS[len(counted)], "count", any(o.size == "small" for o in counted)
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        found = [o for o in objects if o.color == m[1] and o.shape == m[2]]
        return ("yes" if found else "no"), "presence", bool(found) and found[0].size == "small"
    if m := re.fullmatch(r"is the (\w+) (\w+) on the left or right\?", question):
        obj = _find(objects, m[1], m[2])
        assert abs(obj.cx - middle) > clear, "position asked about an object near the middle"
        return ("left" if obj.cx < middle else "right"), "position", obj.size == "small"
    if m := re.fullmatch(r"is the (\w+) (\w+) at the top or bottom\?", question):
        obj = _find(objects, m[1], m[2])
        assert abs(obj.cy - middle) > clear, "position asked about an object near the middle"
        return ("top" if obj.cy < middle else "bottom"), "position", obj.size == "small"
    if m := re.fullmatch(r"is the (\w+) (\w+) (left of|above) the (\w+) (\w+)\?", question):
        a, b = _find(objects, m[1], m[2]), _find(objects, m[4], m[5])
        assert a != b
        small = a.size == "small" or b.size == "small"
        if m[3] == "left of":
            assert abs(a.cx - b.cx) > clear, "left-of asked about objects that are not clearly apart"
            return ("yes" if a.cx < b.cx else "no"), "relative", small
        assert abs(a.cy - b.cy) > clear, "above asked about objects that are not clearly apart"
        return ("yes" if a.cy < b.cy else "no"), "relative", small
    raise AssertionError(f"question matches no known template: {question!r}")


def _fingerprint(seeds: range) -> str:
    digest = hashlib.sha256()
    for seed in seeds:
        scene = make_scene(seed)
        digest.update(scene.image.tobytes())
        digest.update(repr((scene.objects, scene.qas)).encode())
    return digest.hexdigest()


def test_same_seed_same_scene_and_different_seeds_differ() -> None:
    a, b = make_scene(1234), make_scene(1234)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.objects, a.qas) == (b.objects, b.qas)
    images = {make_scene(seed).image.tobytes() for seed in range(20)}
    assert len(images) == 20


def test_same_scene_in_a_fresh_process_with_another_hash_seed() -> None:
    """No dependence on global random state, set order or anything else that varies between runs."""
    code = "from tests.test_scenes import _fingerprint; print(_fingerprint(range(5)))"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == _fingerprint(range(5))


def test_layout_is_pinned() -> None:
    """The held-out set must not change silently: a change here invalidates earlier evaluations.

    If the generator is changed on purpose, update this digest (and say so: old results are not
    comparable with new ones).
    """
    digest = hashlib.sha256(repr([(s.objects, s.qas) for s in map(make_scene, range(10))]).encode())
    assert digest.hexdigest()[:16] == "d91e35caeeb068f5"


def test_image_is_independent_of_question_count() -> None:
    assert make_scene(7, n_questions=1).image.tobytes() == make_scene(7, n_questions=12).image.tobytes()


def test_objects_inside_image_without_overlap_and_unique(scenes: list) -> None:
    counts = Counter(len(scene.objects) for scene in scenes)
    assert set(counts) == {1, 2, 3, 4}
    for scene in scenes:
        assert scene.image.size == (128, 128) and scene.image.mode == "RGB"
        for obj in scene.objects:
            assert obj.shape in SHAPES and obj.color in COLORS and obj.size in ("small", "large")
            assert obj.radius <= obj.cx <= 128 - obj.radius and obj.radius <= obj.cy <= 128 - obj.radius
        for a, b in itertools.combinations(scene.objects, 2):
            assert math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.radius + b.radius
            assert (a.shape, a.color) != (b.shape, b.color)


@pytest.mark.parametrize("size", [64, 128, 224])
def test_other_sizes(size: int) -> None:
    for seed in range(30):
        scene = make_scene(seed, size=size)
        assert scene.image.size == (size, size)
        for obj in scene.objects:
            assert obj.radius <= obj.cx <= size - obj.radius and obj.radius <= obj.cy <= size - obj.radius
        for qa in scene.qas:
            assert expected(qa.question, scene.objects, size) == (qa.answer, qa.qtype, qa.small_object)


def test_small_objects_really_are_small(scenes: list) -> None:
    for obj in (o for scene in scenes for o in scene.objects):
        # Enclosing radius; non-circles are drawn a little larger (see SHAPE_SCALE) to match areas.
        assert (obj.radius <= 11) if obj.size == "small" else (obj.radius >= 13)


def test_shapes_are_drawn_inside_their_radius() -> None:
    """On a flat canvas only pixels within an object's radius (+1 px of anti-aliasing) may change."""
    canvas = Image.new("RGB", (128, 128), (128, 128, 128))
    yy, xx = np.mgrid[0:128, 0:128] + 0.5  # pixel centres
    for seed in range(100):
        objects = make_scene(seed).objects
        changed = np.any(np.asarray(render(canvas, objects)) != 128, axis=-1)
        allowed = np.zeros_like(changed)
        for obj in objects:
            allowed |= np.hypot(xx - obj.cx, yy - obj.cy) <= obj.radius + 1
        assert not np.any(changed & ~allowed), f"seed {seed}: pixels drawn outside the objects' radii"
        assert np.all([changed[int(o.cy), int(o.cx)] for o in objects])


def test_object_centres_have_the_declared_colour(scenes: list) -> None:
    checked: Counter[str] = Counter()
    for scene in scenes:
        pixels = np.asarray(scene.image).astype(int)
        for obj in scene.objects:
            rgb = pixels[int(obj.cy), int(obj.cx)]
            assert np.abs(rgb - COLOR_RGB[obj.color]).max() <= 8, (scene.seed, obj, rgb)
            checked[obj.shape] += 1
    assert set(checked) == set(SHAPES)


def test_every_answer_matches_the_objects(scenes: list) -> None:
    for scene in scenes:
        for qa in scene.qas:
            assert expected(qa.question, scene.objects, 128) == (qa.answer, qa.qtype, qa.small_object), (
                scene.seed,
                qa,
                scene.objects,
            )


def _askable_types(objects: list[SceneObject]) -> set[str]:
    shapes, colors = Counter(o.shape for o in objects), Counter(o.color for o in objects)
    types = {"count", "presence"}
    if 1 in shapes.values():
        types.add("color")
    if 1 in colors.values():
        types.add("shape")
    if any(abs(o.cx - 64) > 12 or abs(o.cy - 64) > 12 for o in objects):
        types.add("position")
    if any(abs(a.cx - b.cx) > 12 or abs(a.cy - b.cy) > 12 for a, b in itertools.combinations(objects, 2)):
        types.add("relative")
    return types


def test_one_question_of_each_askable_type(scenes: list) -> None:
    for scene in scenes:
        assert len(scene.qas) == 6
        assert len({qa.question for qa in scene.qas}) == 6, "a question repeated within a scene"
        assert {qa.qtype for qa in scene.qas} == _askable_types(scene.objects), scene.seed


def test_words_are_in_the_vocabulary(scenes: list) -> None:
    vocab = vocabulary()
    assert vocab == sorted(set(vocab)) and vocab == vocabulary()
    assert "?" in vocab and all(word == word.lower() for word in vocab)
    for qa in (qa for scene in scenes for qa in scene.qas):
        assert set(qa.question.replace("?", " ?").split()) <= set(vocab), qa.question
        assert qa.answer in vocab and " " not in qa.answer


def test_answers_balanced_within_types(scenes: list) -> None:
    answers: dict[str, Counter[str]] = {qtype: Counter() for qtype in QTYPES}
    for qa in (qa for scene in scenes for qa in scene.qas):
        answers[qa.qtype][qa.answer] += 1
    total = sum(sum(c.values()) for c in answers.values())
    for qtype, counter in answers.items():
        assert sum(counter.values()) > total / 10, f"{qtype} too rare: {counter}"
    for qtype in ("presence", "relative"):
        assert 0.4 < answers[qtype]["yes"] / sum(answers[qtype].values()) < 0.6, answers[qtype]
    assert set(answers["color"]) == set(COLORS) and set(answers["shape"]) == set(SHAPES)
    assert set(answers["count"]) == set(NUMBERS)
    assert set(answers["position"]) == {"left", "right", "top", "bottom"}


def test_heldout_seeds_are_never_training_seeds() -> None:
    held = heldout_seeds()
    assert held == heldout_seeds() and len(set(held)) == 300
    assert not set(held) & set(itertools.islice(training_seeds(), 100_000))
    tail = list(training_seeds(start=min(held) - 5))
    assert len(tail) == 5 and max(tail) < min(held)
    with pytest.raises(ValueError):
        training_seeds(start=min(held))


def test_heldout_set_composition(heldout: list[tuple]) -> None:
    assert len(heldout) == 600
    per_type = Counter(qa.qtype for _, qa in heldout)
    assert set(per_type) == set(QTYPES) and min(per_type.values()) >= 40, per_type
    assert all(scene.seed in set(heldout_seeds()) for scene, _ in heldout)
    for scene, qa in heldout:
        assert isinstance(qa, QA) and qa in scene.qas
    small = sum(qa.small_object for _, qa in heldout)
    assert 0.2 * len(heldout) < small < 0.8 * len(heldout), small
    assert [qa for _, qa in heldout[:20]] == [qa for _, qa in heldout_set(10, 2)]


def test_write_image_folder(tmp_path: Path) -> None:
    paths = write_image_folder(tmp_path / "scenes", [3, 10_000_001])
    assert [p.name for p in paths] == ["scene_3.png", "scene_10000001.png"]
    with Image.open(paths[0]) as image:
        assert image.convert("RGB").tobytes() == make_scene(3).image.tobytes()
    records = [
        json.loads(line) for line in (tmp_path / "scenes" / "questions.jsonl").read_text().splitlines()
    ]
    assert len(records) == 12
    assert {"image", "question", "answer", "qtype"} <= set(records[0])
    first = make_scene(3).qas[0]
    assert (records[0]["image"], records[0]["question"], records[0]["answer"]) == (
        "scene_3.png",
        first.question,
        first.answer,
    )
