"""Exact-match VQA accuracy on the held-out scenes: unsplit, and split through a codec.

    unsplit:  image, question ─► AutoProcessor ─► full model.generate ─► answer
    split:    image ─► TxHalf ─► codec.encode ─► bytes ─► codec.decode ─► RxHalf.generate ─► answer

The split path runs both halves in one process (no sockets) so that a whole
held-out pass is quick; the loopback gRPC path is tested separately to give the
same tokens.
"""

from __future__ import annotations

import string
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.progress import Progress

from shared.codecs.artifacts import ArtifactIndex
from shared.codecs.calibrate import build_codec_with
from shared.codecs.calibration import CalibrationArtifact
from shared.codecs.fold import FoldCache
from shared.codecs.ladder import MeasuredLadder
from shared.codecs.pipeline import Codec
from shared.codecs.rate import RateController, RateTarget, usable_ladder
from shared.reference.scenes import QA, QTYPES, VALIDATION_START, Scene, heldout_set
from shared.split import (
    GenerationOptions,
    SplitPoint,
    VisionFeatures,
    check_codec_support,
    features_for_codec,
    load_rx_half,
    load_tx_half,
)
from shared.split.llava import generation_kwargs, stop_token_ids, truncate_at_stop
from shared.split.reference import load_unsplit, unsplit_inputs

ANSWER_OPTIONS = GenerationOptions(max_new_tokens=4)


def normalize(answer: str) -> str:
    return answer.strip().lower().strip(string.punctuation + " ")


@dataclass
class EvalResult:
    """Answers for each held-out item plus the totals derived from them."""

    name: str
    qtypes: list[str]
    expected: list[str]
    answers: list[str]
    payload_bytes: list[int] = field(default_factory=list)
    feature_bytes: int = 0  # raw features per image at the split point, in the checkpoint dtype
    seconds: float = 0.0
    budget_bytes: int = 0  # rate control's target_bytes (0: a fixed codec)
    specs: list[str] = field(default_factory=list)  # rate control: the codec chosen per image

    @property
    def within_budget(self) -> float:
        """Fraction of packets whose payload is at most `budget_bytes` (1.0 without a budget)."""
        if not self.budget_bytes or not self.payload_bytes:
            return 1.0
        return sum(n <= self.budget_bytes for n in self.payload_bytes) / len(self.payload_bytes)

    def spec_counts(self) -> dict[str, int]:
        return dict(Counter(self.specs).most_common())

    @property
    def accuracy(self) -> float:
        return sum(a == e for a, e in zip(self.answers, self.expected, strict=True)) / max(
            1, len(self.expected)
        )

    def per_type(self) -> dict[str, float]:
        total, right = Counter(self.qtypes), Counter[str]()
        for q, a, e in zip(self.qtypes, self.answers, self.expected, strict=True):
            right[q] += a == e
        return {q: right[q] / total[q] for q in QTYPES if total[q]}

    def agreement(self, other: EvalResult) -> float:
        same = sum(a == b for a, b in zip(self.answers, other.answers, strict=True))
        return same / max(1, len(self.answers))

    @property
    def mean_payload_bytes(self) -> float:
        return sum(self.payload_bytes) / len(self.payload_bytes) if self.payload_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": len(self.expected),
            "accuracy": self.accuracy,
            "per_type": self.per_type(),
            "mean_payload_bytes": self.mean_payload_bytes,
            "feature_bytes": self.feature_bytes,
            "seconds": self.seconds,
            "answers": self.answers,
        } | (
            {
                "budget_bytes": self.budget_bytes,
                "within_budget": self.within_budget,
                "max_payload_bytes": max(self.payload_bytes, default=0),
                "chosen_specs": self.spec_counts(),
            }
            if self.budget_bytes
            else {}
        )


def _by_image(items: Sequence[tuple[Scene, QA]]) -> Iterator[tuple[Image.Image, list[tuple[int, QA]]]]:
    """Group consecutive items of one scene so each image is encoded once."""
    group: list[tuple[int, QA]] = []
    current: Scene | None = None
    for i, (scene, qa) in enumerate(items):
        if current is not None and scene.seed != current.seed:
            yield current.image, group
            group = []
        current = scene
        group.append((i, qa))
    if current is not None:
        yield current.image, group


def evaluate_unsplit(
    folder: Path, items: Sequence[tuple[Scene, QA]], progress: Progress | None = None
) -> EvalResult:
    processor, model = load_unsplit(folder)
    stops = stop_token_ids(model, processor.tokenizer)
    answers = [""] * len(items)
    task = progress.add_task("unsplit", total=len(items)) if progress else None
    started = time.perf_counter()
    for image, group in _by_image(items):
        for i, qa in group:
            inputs = unsplit_inputs(processor, [image], qa.question)
            n = int(inputs["input_ids"].shape[1])
            with torch.inference_mode():
                out = model.generate(**inputs, **generation_kwargs(ANSWER_OPTIONS))
            ids = truncate_at_stop(out[0, n:].tolist(), stops)
            answers[i] = normalize(processor.tokenizer.decode(ids, skip_special_tokens=True))
            if progress and task is not None:
                progress.advance(task)
    return EvalResult(
        name="unsplit",
        qtypes=[qa.qtype for _, qa in items],
        expected=[qa.answer for _, qa in items],
        answers=answers,
        seconds=time.perf_counter() - started,
    )


def evaluate_split(
    folder: Path,
    items: Sequence[tuple[Scene, QA]],
    codec_spec: str,
    split_point: SplitPoint = SplitPoint.AFTER_VISION_TOWER,
    progress: Progress | None = None,
    *,
    fold_decoder: bool = False,
    artifacts: ArtifactIndex | Mapping[str, CalibrationArtifact] | None = None,
) -> EvalResult:
    """Split through `codec_spec` (calibrated stages take their fitted state from `artifacts`).

    With `fold_decoder`, a linear codec decoder (pca, sparse) is folded into the projector's
    first Linear as the Rx does (`shared.codecs.fold`); other codecs decode normally. The
    result is named ``SPEC (folded)`` when folding ran.
    """
    codec = build_codec_with(codec_spec, artifacts if artifacts is not None else {})
    tx, rx = load_tx_half(folder, split_point), load_rx_half(folder, split_point)
    check_codec_support(codec, rx.codec_support, type(rx).__name__, token_scores=tx.token_scores)
    leading = rx.leading_linear() if fold_decoder and rx.codec_support.fold_linear else None
    folded = FoldCache(leading).get(codec) if leading is not None else None
    answers = [""] * len(items)
    payloads: list[int] = []
    feature_bytes = 0
    task = progress.add_task(codec_spec, total=len(items)) if progress else None
    started = time.perf_counter()
    for image, group in _by_image(items):
        with torch.inference_mode():
            inputs = tx.preprocess([image])
            features = tx.encode_scored(inputs, codec.score_kind) if codec.score_kind else tx.encode(inputs)
        feats = features.features
        feature_bytes = feats.numel() * feats.element_size()
        shape, features = features_for_codec(codec, features)  # token reducers send fewer tokens
        payload = codec.encode(feats, scores=features.scores)
        payloads.append(len(payload))
        if folded is not None:
            code, _ = codec.decode_compact(payload, shape=shape, dtype=feats.dtype)
            with torch.inference_mode():
                h = folded(code)
            decoded = VisionFeatures(h, dict(features.meta), pre_projected=True)
        else:
            decoded = VisionFeatures(
                codec.decode(payload, shape=shape, dtype=feats.dtype), dict(features.meta)
            )
        for i, qa in group:
            ids = rx.generate(qa.question, decoded, ANSWER_OPTIONS)
            answers[i] = normalize(rx.decode_tokens(ids))
            if progress and task is not None:
                progress.advance(task)
    return EvalResult(
        name=f"{codec.name} (folded)" if folded is not None else codec.name,
        qtypes=[qa.qtype for _, qa in items],
        expected=[qa.answer for _, qa in items],
        answers=answers,
        payload_bytes=payloads,
        feature_bytes=feature_bytes,
        seconds=time.perf_counter() - started,
    )


def evaluate_rate_controlled(
    folder: Path,
    items: Sequence[tuple[Scene, QA]],
    target: RateTarget,
    split_point: SplitPoint = SplitPoint.AFTER_VISION_TOWER,
    progress: Progress | None = None,
    *,
    ladder: MeasuredLadder | None = None,
    artifacts: ArtifactIndex | Mapping[str, CalibrationArtifact] | None = None,
) -> EvalResult:
    """Split inference with the codec chosen per image by rate control (`shared.codecs.rate`);
    with `ladder`, from its measured candidates, most accurate first (calibrated ones from `artifacts`)."""
    tx, rx = load_tx_half(folder, split_point), load_rx_half(folder, split_point)
    family = type(rx).__name__

    def accept(codec: Codec) -> None:
        check_codec_support(codec, rx.codec_support, family, token_scores=tx.token_scores)

    if ladder is not None:
        rate = RateController(measured=ladder, artifacts=artifacts, accept=accept)
    else:
        rate = RateController(usable_ladder(accept=accept))
    name = f"rate:{target.describe()}" + (" (measured ladder)" if ladder is not None else "")
    answers = [""] * len(items)
    payloads: list[int] = []
    specs: list[str] = []
    feature_bytes = 0
    task = progress.add_task(name, total=len(items)) if progress else None
    started = time.perf_counter()
    for image, group in _by_image(items):
        with torch.inference_mode():
            features = tx.encode(tx.preprocess([image]))
        feats = features.features
        feature_bytes = feats.numel() * feats.element_size()
        choice = rate.choose(feats, target)
        shape, features = features_for_codec(choice.codec, features)
        payloads.append(len(choice.payload))
        specs.append(choice.spec)
        decoded = VisionFeatures(
            choice.codec.decode(choice.payload, shape=shape, dtype=feats.dtype), dict(features.meta)
        )
        for i, qa in group:
            ids = rx.generate(qa.question, decoded, ANSWER_OPTIONS)
            answers[i] = normalize(rx.decode_tokens(ids))
            if progress and task is not None:
                progress.advance(task)
    return EvalResult(
        name=name,
        qtypes=[qa.qtype for _, qa in items],
        expected=[qa.answer for _, qa in items],
        answers=answers,
        payload_bytes=payloads,
        feature_bytes=feature_bytes,
        seconds=time.perf_counter() - started,
        budget_bytes=target.max_bytes,
        specs=specs,
    )


def heldout_items(n_images: int = 300, per_image: int = 2) -> list[tuple[Scene, QA]]:
    return heldout_set(n_images=n_images, per_image=per_image)


def validation_items(n_images: int = 100, per_image: int = 2) -> list[tuple[Scene, QA]]:
    """Like `heldout_items`, on the validation scenes (never trained on, never scored on)."""
    return heldout_set(n_images=n_images, per_image=per_image, start=VALIDATION_START)
