"""Seeded synthetic VQA scenes: coloured shapes on crops of real photographs, with short-answer questions.

Why this exists: we train a small reference VLM from scratch on CPU and then measure how feature
compression changes its answers. That needs data that is

* learnable in minutes: few shapes, few colours, a handful of fixed question templates, one-word answers;
* realistic enough for image codecs: the background is a crop of a real photograph (scikit-image's
  bundled samples, available offline), not a flat colour;
* sensitive to detail: about half the objects are small (12-16 px on a 128 px image, i.e. about 2x2
  patches of 8 px), and every QA says whether its answer depends on a small object, so aggressive token
  pruning or quantisation shows up in the accuracy on those questions.

Everything is a pure function of the seed: ``numpy.random.default_rng`` streams derived from the seed
(no global random state), integer pixel arithmetic, PIL drawing at integer coordinates. The same seed
gives byte-identical images and the same questions on any machine with the same numpy / Pillow /
scikit-image versions (those pin the random streams, the resampling code and the sample photos).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "black")
SIZES: tuple[str, ...] = ("small", "large")
QTYPES: tuple[str, ...] = ("color", "shape", "count", "presence", "position", "relative")

# Saturated, well separated fill colours; the backgrounds are desaturated so these stand out.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 80, 235),
    "yellow": (250, 220, 30),
    "white": (250, 250, 250),
    "black": (12, 12, 12),
}
# A thin outline of the opposite lightness keeps e.g. white on a bright sky or black on the moon visible.
_DARK_OUTLINE = (25, 25, 25)
_LIGHT_OUTLINE = (235, 235, 235)
OUTLINE_RGB: dict[str, tuple[int, int, int]] = {
    "red": _LIGHT_OUTLINE,
    "green": _DARK_OUTLINE,
    "blue": _LIGHT_OUTLINE,
    "yellow": _DARK_OUTLINE,
    "white": _DARK_OUTLINE,
    "black": _LIGHT_OUTLINE,
}

# scikit-image sample images that ship with the package (no download needed).
BACKGROUNDS: tuple[str, ...] = (
    "grass",
    "gravel",
    "brick",
    "coffee",
    "astronaut",
    "camera",
    "chelsea",
    "rocket",
    "cat",
    "moon",
    "horse",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "colorwheel",
)

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}

# The only question wordings. Kept few and fixed because the reference model's vocabulary is built from
# them (see vocabulary()).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("what color is the {shape}?",),
    "shape": ("what shape is the {color} object?",),
    "count": ("how many {shapes} are there?", "how many objects are there?"),
    "presence": ("is there a {color} {shape}?",),
    "position": (
        "is the {color} {shape} on the left or right?",
        "is the {color} {shape} at the top or bottom?",
    ),
    "relative": (
        "is the {color} {shape} left of the {color2} {shape2}?",
        "is the {color} {shape} above the {color2} {shape2}?",
    ),
}
ANSWERS: dict[str, tuple[str, ...]] = {
    "color": COLORS,
    "shape": SHAPES,
    "count": NUMBER_WORDS,
    "presence": ("yes", "no"),
    "position": ("left", "right", "top", "bottom"),
    "relative": ("yes", "no"),
}

# Relative odds of choosing an answer when several are possible in a scene. Counts of three and four
# are only possible in the busiest scenes, zero and one in nearly all, so they are weighted to even out.
ANSWER_WEIGHTS: dict[str, float] = {"zero": 1.0, "one": 1.3, "two": 3.0, "three": 8.0, "four": 14.0}

MAX_OBJECTS = 4
REFERENCE_SIZE = 128  # geometry below is given for this image size and scaled for others
# Radius of a circle in px at REFERENCE_SIZE: diameters 12-16 (about 2x2 patches of 8 px) and 26-40.
RADIUS_RANGE: dict[str, tuple[float, float]] = {"small": (6.0, 8.0), "large": (13.0, 20.0)}
# Other shapes get a larger enclosing radius so that their area is closer to the circle's (a square
# inscribed in the same circle has 64 % of its area, a triangle or star under 50 %); otherwise a small
# star would be a few pixels and barely learnable.
SHAPE_SCALE: dict[str, float] = {"circle": 1.0, "square": 1.15, "triangle": 1.3, "star": 1.3}
MIN_GAP = 3.0  # px between the enclosing circles of two objects
EDGE_MARGIN = 2.0  # px between an enclosing circle and the image border
CLEAR_OFFSET = 12.0  # px a centre must be from a midline (or from another centre) for a spatial question
_PLACEMENT_TRIES = 60
_SUPERSAMPLE = 2  # draw at 2x, then box-downsample: deterministic anti-aliasing
_OUTLINE_WIDTH = 2  # at the supersampled resolution, i.e. 1 px in the final image

# Question types from the one fewest scenes can ask to the one every scene can ask.
_SCARCITY: tuple[str, ...] = ("relative", "color", "shape", "position", "count", "presence")

HELDOUT_START = 10_000_000  # seeds >= this are reserved for evaluation and never used for training
# Scenes for choices made from measurements (rate control's measured ladder), so that those
# choices are never tuned on the held-out scenes they are scored on. Training never gets here.
VALIDATION_START = 9_000_000

# Independent random streams per seed, so that e.g. asking more questions does not change the image.
_STREAM_IMAGE = 0
_STREAM_QUESTIONS = 1


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape. (cx, cy) is its centre in pixels; radius encloses the whole shape."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    radius: float


@dataclass(frozen=True)
class QA:
    """A question with its one-word answer; small_object says the answer depends on a small object."""

    question: str
    answer: str
    qtype: str
    small_object: bool


@dataclass
class Scene:
    """A rendered scene; objects are the ground truth that every QA's answer is computed from."""

    seed: int
    image: Image.Image
    objects: list[SceneObject]
    qas: list[QA]


# --------------------------------------------------------------------------------------------- vocabulary


def tokenize(text: str) -> list[str]:
    """Lowercase words with "?" as its own token: the tokenisation vocabulary() is built for."""
    return text.lower().replace("?", " ?").split()


def vocabulary() -> list[str]:
    """Every token any question or answer can contain, sorted, so a word-level model can be built once."""
    words: set[str] = set()
    for templates in TEMPLATES.values():
        for template in templates:
            for token in tokenize(template):
                if not token.startswith("{"):
                    words.add(token)
    words.update(SHAPES, PLURALS.values(), COLORS)
    for answers in ANSWERS.values():
        words.update(answers)
    return sorted(words)


# ------------------------------------------------------------------------------------------------ seeds


def heldout_seeds(n: int = 300) -> list[int]:
    """Fixed evaluation seeds, from a range that training_seeds() never reaches."""
    return list(range(HELDOUT_START, HELDOUT_START + n))


def training_seeds(start: int = 0) -> Iterator[int]:
    """Training seeds start, start+1, ... up to (never including) the held-out range."""
    if not 0 <= start < HELDOUT_START:
        raise ValueError(f"training seeds must lie in [0, {HELDOUT_START}); got start={start}")
    return iter(range(start, HELDOUT_START))


# ------------------------------------------------------------------------------------------------ images


@functools.cache
def _photo(name: str) -> Image.Image:
    """A scikit-image sample as a muted RGB image, loaded once per process.

    Muted (60 % saturation, values squeezed into [40, 216]) so that the saturated object colours and
    pure white/black stay distinguishable from the photo. Integer arithmetic keeps it exact.
    """
    import skimage.data  # imported lazily: vocabulary() users should not pay for scikit-image

    array = np.asarray(getattr(skimage.data, name)())
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    rgb = array[..., :3].astype(np.int32)
    gray = (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114) // 1000
    rgb = gray[..., None] + (rgb - gray[..., None]) * 6 // 10
    rgb = 40 + rgb * 176 // 255
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


@functools.cache
def _background_source(name: str, size: int) -> Image.Image:
    """The photo box-reduced by an integer factor to a short side of about 2-4x size, cached.

    Resizing a crop of a 1000 px photo straight to 128 px costs milliseconds (the filter spans the whole
    crop); from this pre-reduced copy it is a fraction of one, which keeps on-the-fly generation fast.
    """
    photo = _photo(name)
    factor = max(1, min(photo.size) // (2 * size))
    return photo.reduce(factor) if factor > 1 else photo


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A random square crop (position, scale, horizontal flip) of a random photo, resized to size."""
    source = _background_source(BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], size)
    width, height = source.size
    side = max(8, round(min(width, height) * float(rng.uniform(0.35, 1.0))))
    x0 = int(rng.integers(0, width - side + 1))
    y0 = int(rng.integers(0, height - side + 1))
    crop = source.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return crop


def _half_pixel(value: float) -> float:
    """Round to a multiple of 0.5 px so that supersampled coordinates are integers (exact drawing)."""
    return round(value * 2) / 2


def _layout(rng: np.random.Generator, size: int) -> list[SceneObject]:
    """1-4 non-overlapping objects with unique (shape, color) pairs, placed by rejection sampling."""
    scale = size / REFERENCE_SIZE
    n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    objects: list[SceneObject] = []
    for _ in range(n_objects):
        for _ in range(_PLACEMENT_TRIES):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = COLORS[int(rng.integers(len(COLORS)))]
            size_name = SIZES[int(rng.integers(len(SIZES)))]
            low, high = RADIUS_RANGE[size_name]
            radius = _half_pixel(float(rng.uniform(low, high)) * SHAPE_SCALE[shape] * scale)
            reach = radius + EDGE_MARGIN * scale
            cx = _half_pixel(float(rng.uniform(reach, size - reach)))
            cy = _half_pixel(float(rng.uniform(reach, size - reach)))
            candidate = SceneObject(shape, color, size_name, cx, cy, radius)
            if all(_fits_beside(candidate, other, MIN_GAP * scale) for other in objects):
                objects.append(candidate)
                break
    return objects


def _fits_beside(a: SceneObject, b: SceneObject, gap: float) -> bool:
    if (a.shape, a.color) == (b.shape, b.color):
        return False  # unique pairs keep "the red circle" unambiguous
    return math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.radius + b.radius + gap


def _unit_polygon(radii: Sequence[float]) -> list[tuple[float, float]]:
    """Vertices on the given radii, evenly spaced in angle, first one pointing up."""
    count = len(radii)
    return [
        (
            r * math.cos(-math.pi / 2 + 2 * math.pi * i / count),
            r * math.sin(-math.pi / 2 + 2 * math.pi * i / count),
        )
        for i, r in enumerate(radii)
    ]


_TRIANGLE = _unit_polygon([1.0] * 3)
_STAR = _unit_polygon([1.0, 0.5] * 5)  # inner radius 0.5: chunky enough to stay a star when small


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, factor: int, mask: bool = False) -> None:
    """Draw obj on a canvas `factor` times the scene size; every shape stays inside its radius.

    mask=True draws it in white (255) on a one-channel canvas, outline included: its footprint.
    """
    cx, cy, r = round(obj.cx * factor), round(obj.cy * factor), round(obj.radius * factor)
    fill: tuple[int, int, int] | int = 255 if mask else COLOR_RGB[obj.color]
    outline: tuple[int, int, int] | int = 255 if mask else OUTLINE_RGB[obj.color]
    width = _OUTLINE_WIDTH
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r - 1, cy + r - 1), fill=fill, outline=outline, width=width)
    elif obj.shape == "square":
        half = round(r / math.sqrt(2))
        box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    else:
        unit = _TRIANGLE if obj.shape == "triangle" else _STAR
        points = [(cx + round(x * r), cy + round(y * r)) for x, y in unit]
        draw.polygon(points, fill=fill, outline=outline, width=width)


def render(background: Image.Image, objects: Sequence[SceneObject]) -> Image.Image:
    """Draw objects on the background with anti-aliased edges.

    The background is blown up by pixel repetition, the shapes are drawn at that resolution, and the
    result is box-reduced back: background pixels come back unchanged, shape edges get 2x2 coverage
    anti-aliasing, and no step depends on floating-point details.
    """
    width, height = background.size
    canvas = background.resize((width * _SUPERSAMPLE, height * _SUPERSAMPLE), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        _draw_object(draw, obj, _SUPERSAMPLE)
    return canvas.reduce(_SUPERSAMPLE)


def object_coverage(objects: Sequence[SceneObject], size: int, grid: int) -> np.ndarray:
    """``[objects, grid*grid]`` float32: the fraction of each grid cell that each object covers.

    Rendered with the same geometry as the image (at the same supersampling), so a patch label
    derived from it is exact, not a circle approximation of a star.
    """
    cell = size * _SUPERSAMPLE // grid
    out = np.zeros((len(objects), grid * grid), np.float32)
    for k, obj in enumerate(objects):
        canvas = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
        _draw_object(ImageDraw.Draw(canvas), obj, _SUPERSAMPLE, mask=True)
        cells = np.asarray(canvas, np.float32).reshape(grid, cell, grid, cell).mean(axis=(1, 3))
        out[k] = cells.reshape(-1) / 255.0
    return out


# --------------------------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class _Candidate:
    qa: QA
    weight: float = 1.0


def _name(obj: SceneObject) -> dict[str, str]:
    return {"color": obj.color, "shape": obj.shape}


def _color_candidates(objects: Sequence[SceneObject]) -> list[_Candidate]:
    """Ask for the colour of a shape only when exactly one object has that shape."""
    out = []
    for obj in objects:
        if sum(o.shape == obj.shape for o in objects) == 1:
            question = TEMPLATES["color"][0].format(shape=obj.shape)
            out.append(_Candidate(QA(question, obj.color, "color", obj.size == "small")))
    return out


def _shape_candidates(objects: Sequence[SceneObject]) -> list[_Candidate]:
    """Ask for the shape of a colour only when exactly one object has that colour."""
    out = []
    for obj in objects:
        if sum(o.color == obj.color for o in objects) == 1:
            question = TEMPLATES["shape"][0].format(color=obj.color)
            out.append(_Candidate(QA(question, obj.shape, "shape", obj.size == "small")))
    return out


def _count_candidates(objects: Sequence[SceneObject]) -> list[_Candidate]:
    """Count all objects or one shape (possibly zero); small if any counted object is small."""
    total = TEMPLATES["count"][1]
    out = [
        _Candidate(
            QA(total, NUMBER_WORDS[len(objects)], "count", any(o.size == "small" for o in objects)),
            # Weighted so "how many objects" is asked about as often as all shape counts together.
            weight=float(len(SHAPES)),
        )
    ]
    for shape in SHAPES:
        counted = [o for o in objects if o.shape == shape]
        question = TEMPLATES["count"][0].format(shapes=PLURALS[shape])
        small = any(o.size == "small" for o in counted)
        out.append(_Candidate(QA(question, NUMBER_WORDS[len(counted)], "count", small)))
    return out


def _presence_candidates(objects: Sequence[SceneObject]) -> list[_Candidate]:
    """Every present pair ("yes") and every absent one ("no").

    Absent pairs that share a colour or a shape with a present object are weighted up: "is there a red
    star?" next to a red circle and a blue star tests binding colour to shape, not just spotting a colour.
    """
    present = {(o.shape, o.color) for o in objects}
    out = [
        _Candidate(QA(TEMPLATES["presence"][0].format(**_name(o)), "yes", "presence", o.size == "small"))
        for o in objects
    ]
    for shape, color in itertools.product(SHAPES, COLORS):
        if (shape, color) in present:
            continue
        near_miss = any(shape == s or color == c for s, c in present)
        question = TEMPLATES["presence"][0].format(color=color, shape=shape)
        out.append(_Candidate(QA(question, "no", "presence", False), weight=4.0 if near_miss else 1.0))
    return out


def _position_candidates(objects: Sequence[SceneObject], size: int) -> list[_Candidate]:
    """Left/right or top/bottom, only for objects clearly off the corresponding midline."""
    clear = CLEAR_OFFSET * size / REFERENCE_SIZE
    middle = size / 2
    left_right, top_bottom = TEMPLATES["position"]
    out = []
    for obj in objects:
        small = obj.size == "small"
        if abs(obj.cx - middle) > clear:
            answer = "left" if obj.cx < middle else "right"
            out.append(_Candidate(QA(left_right.format(**_name(obj)), answer, "position", small)))
        if abs(obj.cy - middle) > clear:
            answer = "top" if obj.cy < middle else "bottom"
            out.append(_Candidate(QA(top_bottom.format(**_name(obj)), answer, "position", small)))
    return out


def _relative_candidates(objects: Sequence[SceneObject], size: int) -> list[_Candidate]:
    """Ask whether A is left of / above B, for ordered pairs whose centres differ clearly on that axis."""
    clear = CLEAR_OFFSET * size / REFERENCE_SIZE
    left_of, above = TEMPLATES["relative"]
    out = []
    for a, b in itertools.permutations(objects, 2):
        names = {**_name(a), "color2": b.color, "shape2": b.shape}
        small = a.size == "small" or b.size == "small"
        if abs(a.cx - b.cx) > clear:
            answer = "yes" if a.cx < b.cx else "no"
            out.append(_Candidate(QA(left_of.format(**names), answer, "relative", small)))
        if abs(a.cy - b.cy) > clear:
            answer = "yes" if a.cy < b.cy else "no"
            out.append(_Candidate(QA(above.format(**names), answer, "relative", small)))
    return out


def question_candidates(objects: Sequence[SceneObject], size: int = REFERENCE_SIZE) -> dict[str, list[QA]]:
    """Every question the templates allow about these objects, by qtype (empty list: not askable)."""
    return {qtype: [c.qa for c in cands] for qtype, cands in _all_candidates(objects, size).items()}


def _all_candidates(objects: Sequence[SceneObject], size: int) -> dict[str, list[_Candidate]]:
    return {
        "color": _color_candidates(objects),
        "shape": _shape_candidates(objects),
        "count": _count_candidates(objects),
        "presence": _presence_candidates(objects),
        "position": _position_candidates(objects, size),
        "relative": _relative_candidates(objects, size),
    }


def _weighted_index(rng: np.random.Generator, weights: Sequence[float]) -> int:
    """Index drawn with probability proportional to weights (one uniform draw, no numpy arrays)."""
    threshold = float(rng.random()) * sum(weights)
    for index, cumulative in enumerate(itertools.accumulate(weights)):
        if threshold < cumulative:
            return index
    return len(weights) - 1


def _pick(
    rng: np.random.Generator, qtype: str, candidates: Sequence[_Candidate], given: Counter[str]
) -> QA | None:
    """Choose an answer first, then a question giving it (by candidate weight).

    Choosing the answer first balances answers within a type (yes/no 50/50, left/right/top/bottom even)
    instead of letting the most numerous kind of question dominate. Only answers given least often so
    far in this scene are allowed, so a second presence question in a scene is "no" after a "yes";
    None when no such answer can be asked here.
    """
    by_answer: dict[str, list[_Candidate]] = {}
    for cand in candidates:
        by_answer.setdefault(cand.qa.answer, []).append(cand)
    fewest = min(given[answer] for answer in ANSWERS[qtype])
    answers = [answer for answer in ANSWERS[qtype] if answer in by_answer and given[answer] == fewest]
    if not answers:
        return None
    answer = answers[_weighted_index(rng, [ANSWER_WEIGHTS.get(a, 1.0) for a in answers])]
    group = by_answer[answer]
    return group[_weighted_index(rng, [c.weight for c in group])].qa


def _ask(rng: np.random.Generator, objects: Sequence[SceneObject], size: int, n_questions: int) -> list[QA]:
    """One question per askable type (in random order), then more of random types, never repeating one."""
    pools = {qtype: cands for qtype, cands in _all_candidates(objects, size).items() if cands}
    given = {qtype: Counter[str]() for qtype in QTYPES}
    qas: list[QA] = []

    def take(qtype: str) -> None:
        qa = _pick(rng, qtype, pools[qtype], given[qtype])
        if qa is not None:
            qas.append(qa)
            given[qtype][qa.answer] += 1
            pools[qtype] = [c for c in pools[qtype] if c.qa.question != qa.question]
        if qa is None or not pools[qtype]:
            del pools[qtype]

    for index in rng.permutation(len(QTYPES)):
        if len(qas) < n_questions and QTYPES[index] in pools:
            take(QTYPES[index])
    while len(qas) < n_questions and pools:
        remaining = sorted(pools, key=QTYPES.index)
        take(remaining[int(rng.integers(len(remaining)))])
    return qas


# ------------------------------------------------------------------------------------------------ scenes


def make_scene(seed: int, size: int = REFERENCE_SIZE, n_questions: int = 6) -> Scene:
    """The scene for a seed: image, objects and n_questions QAs (one of each type where possible).

    The image depends only on (seed, size); the questions on (seed, size, n_questions).
    """
    image_rng = np.random.default_rng([seed, _STREAM_IMAGE])
    background = _background(image_rng, size)
    objects = _layout(image_rng, size)
    image = render(background, objects)
    qas = _ask(np.random.default_rng([seed, _STREAM_QUESTIONS]), objects, size, n_questions)
    return Scene(seed=seed, image=image, objects=objects, qas=qas)


def heldout_set(
    n_images: int = 300, per_image: int = 2, start: int = HELDOUT_START
) -> list[tuple[Scene, QA]]:
    """A fixed evaluation list: per_image QAs of distinct types per held-out scene, types balanced.
    (`start=VALIDATION_START`: the same kind of list on the validation scenes.)

    Each scene contributes the types that are least represented so far, ties going to the types that
    fewer scenes can ask (e.g. "relative" needs two objects), so the counts per type come out even.
    """
    counts = dict.fromkeys(QTYPES, 0)
    items: list[tuple[Scene, QA]] = []
    for seed in range(start, start + n_images):
        scene = make_scene(seed, n_questions=len(QTYPES))
        by_type = {qa.qtype: qa for qa in reversed(scene.qas)}  # first QA of each type wins
        chosen = sorted(by_type, key=lambda qtype: (counts[qtype], _SCARCITY.index(qtype)))[:per_image]
        for qtype in sorted(chosen, key=QTYPES.index):
            counts[qtype] += 1
            items.append((scene, by_type[qtype]))
    return items


def write_image_folder(out: Path, seeds: list[int]) -> list[Path]:
    """Write scene_<seed>.png per seed and questions.jsonl (one line per QA) for tools and benchmarks."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    lines: list[str] = []
    for seed in seeds:
        scene = make_scene(seed)
        path = out / f"scene_{seed}.png"
        scene.image.save(path, format="PNG")
        paths.append(path)
        for qa in scene.qas:
            record = {
                "image": path.name,
                "seed": seed,
                "question": qa.question,
                "answer": qa.answer,
                "qtype": qa.qtype,
                "small_object": qa.small_object,
            }
            lines.append(json.dumps(record))
    (out / "questions.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return paths
