"""The measurements behind `splitvlm bench`, all in one run and one process.

Split path, per codec (in-process, the code paths the services run):

    image ─► TxHalf.preprocess ─► TxHalf.encode ─► Codec.encode ─► build_header + packet_to_bytes
          ─► Codec.decode (or decode_compact + the folded Linear, as the Rx engine does)
          ─► RxHalf.build_inputs (connector) ─► model forward over the prompt (prefill)
          ─► RxHalf.generate (answer; per-token times from its token callback)

Cloud-only path, per image codec: the image at the model's input resolution ─► PIL encode
─► bytes ─► PIL decode ─► processor + the unsplit model's generate.

Then a real transfer through `ThrottledProxy` between the Tx and Rx services on loopback
checks the latency model at one rate.
"""

from __future__ import annotations

import itertools
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from shared.bench.baselines import (
    DEFAULT_IMAGE_CODECS,
    ImageCodec,
    at_input_resolution,
    center_crops,
    input_size,
)
from shared.bench.latency import (
    PathCost,
    ThrottledProxy,
    UploadClient,
    UploadServer,
    crossover_mbps,
    transfer_ms,
)
from shared.bench.timings import StageTimes, median, percentile, summary
from shared.codecs.artifacts import ArtifactIndex, artifacts_for
from shared.codecs.calibrate import build_codec_with
from shared.codecs.fold import FoldCache
from shared.codecs.rate import RateController, RateTarget, usable_ladder
from shared.config import DEFAULT_MODEL
from shared.errors import CodecError, SplitVlmError
from shared.protocol.packet import build_header, packet_to_bytes
from shared.reference.evaluate import ANSWER_OPTIONS, EvalResult, heldout_items, normalize
from shared.split import (
    GenerationOptions,
    RxHalf,
    SplitPoint,
    TxHalf,
    VisionFeatures,
    check_codec_support,
    features_for_codec,
    load_rx_half,
    load_tx_half,
)
from shared.split.llava import generation_kwargs, stop_token_ids, truncate_at_stop
from shared.split.reference import load_unsplit, unsplit_inputs

DEFAULT_CODECS: tuple[str, ...] = (
    "lossless",
    "fp16",
    "int8",
    "balanced",
    "tiny",
    "pool:2|int8|zstd",
    "prune:0.5|linear:bits=4|zstd",
)
DEFAULT_BANDWIDTHS: tuple[float, ...] = (0.5, 2.0, 10.0, 100.0)
REFERENCE_CODEC = "lossless"
ACCURACY_SLACK = 0.01  # "within 1 point"
OVERHEAD_TARGET = 0.05  # encode <= 5% of the vision encoder, decode <= 5% of prefill
TARGET_PRESET = "balanced"
JPEG_YARDSTICK = ImageCodec("JPEG", 75)
VALIDATE_MAX = 20  # throttled-link requests per path by default

Advance = Callable[[str], None]


@dataclass
class BenchConfig:
    model: str = DEFAULT_MODEL
    codecs: Sequence[str] = DEFAULT_CODECS
    image_codecs: Sequence[ImageCodec] = DEFAULT_IMAGE_CODECS
    images: int = 50  # held-out scenes (2 questions each)
    per_image: int = 2
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS
    rtt_ms: float = 40.0
    threads: int = 1  # torch threads (0: torch's default); throughput is per core of these
    split: SplitPoint = SplitPoint.AFTER_VISION_TOWER
    validate: bool = True  # real transfer through the throttled loopback link
    validate_mbps: float | None = None  # default: the lowest bandwidth
    validate_requests: int = 0  # 0: one per image, at most VALIDATE_MAX
    image_folder: Path | None = None  # with `questions`: the user's images instead of the scenes
    # JSON lines {"image": file, "question": ..., "answer": optional, "qtype": optional}, e.g. from
    # shared.reference.scenes.write_image_folder; images in `image_folder` (default: its folder).
    questions: Path | None = None
    max_new_tokens: int = ANSWER_OPTIONS.max_new_tokens
    codec_artifacts: Sequence[Path] = ()  # calibration artifacts for calibrated codecs (pca, kmeans, ...)
    # Rate control: one pass per byte budget, a codec chosen per image (the model's measured
    # ladder when it has one, else the default ladder).
    target_bytes: Sequence[int] = ()


@dataclass
class Group:
    """One image and the items (index into the flat item lists) that ask about it."""

    key: str
    image: Image.Image
    items: list[tuple[int, str]]  # (item index, question)


@dataclass
class Items:
    groups: list[Group]
    qtypes: list[str]
    expected: list[str]
    source: str
    has_answers: bool = True

    def result(self, name: str, answers: list[str], **kw: Any) -> EvalResult:
        return EvalResult(name=name, qtypes=self.qtypes, expected=self.expected, answers=answers, **kw)


def load_items(config: BenchConfig, size: tuple[int, int] | None, crop: bool = False) -> Items:
    """The held-out scenes (or the user's folder + question list), images at the model's input size."""
    if config.questions is not None or config.image_folder is not None:
        if config.questions is None:
            raise SplitVlmError("--image-folder needs --questions (JSON lines {image, question, answer})")
        folder = config.image_folder or config.questions.parent
        by_image: dict[str, Group] = {}
        qtypes: list[str] = []
        expected: list[str] = []
        for n, line in enumerate(config.questions.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, question = str(row["image"]), str(row["question"])
            except (ValueError, KeyError, TypeError) as e:
                raise SplitVlmError(f"{config.questions}:{n + 1}: need {{image, question}}: {e}") from e
            if name not in by_image:
                with Image.open(folder / name) as img:
                    by_image[name] = Group(name, at_input_resolution(img, size, crop), [])
            by_image[name].items.append((len(expected), question))
            expected.append(normalize(str(row.get("answer", ""))))
            qtypes.append(str(row.get("qtype", row.get("type", "other"))))
        return Items(
            list(by_image.values()),
            qtypes,
            expected,
            f"{folder} + {config.questions}",
            has_answers=all(expected),
        )
    pairs = heldout_items(config.images, config.per_image)
    groups: list[Group] = []
    for i, (scene, qa) in enumerate(pairs):
        key = str(scene.seed)
        if not groups or groups[-1].key != key:
            groups.append(Group(key, at_input_resolution(scene.image, size, crop), []))
        groups[-1].items.append((i, qa.question))
    return Items(
        groups,
        [qa.qtype for _, qa in pairs],
        [qa.answer for _, qa in pairs],
        f"held-out scenes ({len(groups)} images)",
    )


@dataclass
class PathRecord:
    """Per-request samples of one inference path."""

    times: StageTimes = field(default_factory=StageTimes)
    tx_ms: list[float] = field(default_factory=list)
    rx_ms: list[float] = field(default_factory=list)
    uplink_bytes: list[int] = field(default_factory=list)

    def cost(self, name: str) -> PathCost:
        return PathCost(name, median(self.tx_ms), median(self.rx_ms), float(median(self.uplink_bytes)))


def _bytes_stats(values: Sequence[int]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "p95": percentile(values, 95.0), "max": float(max(values))}


def _split_answer(
    rx: RxHalf, question: str, features: VisionFeatures, options: GenerationOptions, times: StageTimes
) -> tuple[str, float]:
    """Answer through the Rx half, timing connector, prefill and per-token decode; (answer, Rx ms)."""
    start = time.perf_counter()
    inputs = rx.build_inputs(question, features)
    times.add("connector", (time.perf_counter() - start) * 1e3)
    model = getattr(rx, "model", None)
    if model is not None:  # the prefill alone: one forward over the prompt (image tokens included)
        if "inputs_embeds" in inputs:  # generate takes both; a forward takes one
            inputs = {k: v for k, v in inputs.items() if k != "input_ids"}
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                model(**inputs, use_cache=True)
            times.add("prefill", (time.perf_counter() - start) * 1e3)
        except (TypeError, ValueError, RuntimeError):
            model = None  # a family whose generate inputs a plain forward refuses: time to 1st token
    stamps: list[float] = []
    start = time.perf_counter()
    ids = rx.generate(question, features, options, on_token=lambda _t: stamps.append(time.perf_counter()))
    end = time.perf_counter()
    if stamps:
        times.add("first_token", (stamps[0] - start) * 1e3)
        if model is None:
            times.add("prefill", (stamps[0] - start) * 1e3)
    for a, b in itertools.pairwise(stamps):
        times.add("per_token_decode", (b - a) * 1e3)
    times.add("rx_generate", (end - start) * 1e3)
    return normalize(rx.decode_tokens(ids)), (end - start) * 1e3


def _vision_pass(
    tx: TxHalf, items: Items, advance: Advance
) -> tuple[list[VisionFeatures], StageTimes, list[float]]:
    times = StageTimes()
    feats: list[VisionFeatures] = []
    per_image: list[float] = []
    for group in items.groups:
        t0 = time.perf_counter()
        inputs = tx.preprocess([group.image])
        t1 = time.perf_counter()
        with torch.inference_mode():
            feats.append(tx.encode(inputs))
        t2 = time.perf_counter()
        times.add("preprocess", (t1 - t0) * 1e3)
        times.add("vision_encoder", (t2 - t1) * 1e3)
        per_image.append((t2 - t0) * 1e3)
        advance("vision encoder")
    return feats, times, per_image


def _run_codec(
    spec: str,
    tx: TxHalf,
    rx: RxHalf,
    items: Items,
    feats: list[VisionFeatures],
    tx_front_ms: list[float],
    options: GenerationOptions,
    split: SplitPoint,
    fold: FoldCache | None,
    artifacts: ArtifactIndex,
    advance: Advance,
) -> tuple[dict[str, Any], EvalResult, PathRecord]:
    codec = build_codec_with(spec, artifacts)
    check_codec_support(codec, rx.codec_support, type(rx).__name__, token_scores=tx.token_scores)
    folded = fold.get(codec) if fold is not None else None
    record = PathRecord()
    answers = [""] * len(items.expected)
    payloads: list[int] = []
    raw_bytes = 0
    warm = feats[0]  # one untimed round trip: first-call costs stay out of the timings
    warm_shape, warm_reduced = features_for_codec(codec, warm)
    if not codec.score_kind:
        codec.decode(
            codec.encode(warm.features, scores=warm_reduced.scores),
            shape=warm_shape,
            dtype=warm.features.dtype,
        )
    for group, features, front_ms in zip(items.groups, feats, tx_front_ms, strict=True):
        if codec.score_kind:  # e.g. prune:score=cls: the tower's scores ride along (not timed again)
            with torch.inference_mode():
                features = tx.encode_scored(tx.preprocess([group.image]), codec.score_kind)
        x = features.features
        raw_bytes = x.numel() * x.element_size()
        t0 = time.perf_counter()
        shape, reduced = features_for_codec(codec, features)
        payload = codec.encode(x, scores=reduced.scores)
        t1 = time.perf_counter()
        header = build_header(
            request_id=f"bench-{group.key}",
            model_fingerprint="bench",
            split_point=split,
            codec_spec=codec.spec,
            codec_fingerprint=codec.fingerprint,
            features=reduced,
            payload=payload,
            shape=shape,
        )
        packet = packet_to_bytes(header, payload)
        t2 = time.perf_counter()
        if folded is not None:
            z, _ = codec.decode_compact(payload, shape, x.dtype)
            with torch.inference_mode():
                h = folded(z.to(device=folded.weight.device, dtype=folded.weight.dtype))
            decoded = VisionFeatures(h, dict(reduced.meta), pre_projected=True)
        else:
            decoded = VisionFeatures(codec.decode(payload, shape=shape, dtype=x.dtype), dict(reduced.meta))
        t3 = time.perf_counter()
        record.times.add("codec_encode", (t1 - t0) * 1e3)
        record.times.add("serialize", (t2 - t1) * 1e3)
        record.times.add("codec_decode", (t3 - t2) * 1e3)
        payloads.append(len(payload))
        tx_ms = front_ms + (t2 - t0) * 1e3
        for index, question in group.items:
            answers[index], gen_ms = _split_answer(rx, question, decoded, options, record.times)
            record.tx_ms.append(tx_ms)
            record.rx_ms.append((t3 - t2) * 1e3 + gen_ms)
            record.uplink_bytes.append(len(packet) + len(question.encode()))
            advance(spec)
    result = items.result(codec.name, answers, payload_bytes=payloads, feature_bytes=raw_bytes)
    fp16_bytes = raw_bytes // x.element_size() * 2
    t = record.times
    threads = torch.get_num_threads()
    row = {
        "spec": spec,
        "expanded": codec.spec,
        "folded_decode": folded is not None,
        "payload_bytes": _bytes_stats(payloads),
        "wire_bytes": _bytes_stats(record.uplink_bytes),
        "raw_feature_bytes": raw_bytes,
        "fp16_feature_bytes": fp16_bytes,
        "ratio_vs_fp16": result.mean_payload_bytes / fp16_bytes,
        "accuracy": result.accuracy,
        "per_type": result.per_type(),
        "timings_ms": t.summary(),
        "throughput_mb_s_per_core": {
            "encode": raw_bytes / 1e6 / (t.median("codec_encode") / 1e3) / threads,
            "decode": raw_bytes / 1e6 / (t.median("codec_decode") / 1e3) / threads,
        },
    }
    return row, result, record


def _run_rate(
    budget: int,
    rate: RateController,
    rx: RxHalf,
    items: Items,
    feats: list[VisionFeatures],
    options: GenerationOptions,
    advance: Advance,
) -> dict[str, Any]:
    """Split with rate control at one byte budget; images no codec fits count as unanswered."""
    answers = [""] * len(items.expected)
    payloads: list[int] = []
    chosen: dict[str, int] = {}
    unreachable = 0
    times = StageTimes()
    for group, features in zip(items.groups, feats, strict=True):
        try:
            choice = rate.choose(features.features, RateTarget(budget))
        except CodecError:
            unreachable += 1
            for _ in group.items:
                advance(f"rate:{budget}")
            continue
        shape, reduced = features_for_codec(choice.codec, features)
        decoded = VisionFeatures(
            choice.codec.decode(choice.payload, shape=shape, dtype=features.features.dtype),
            dict(reduced.meta),
        )
        payloads.append(len(choice.payload))
        chosen[choice.spec] = chosen.get(choice.spec, 0) + 1
        for index, question in group.items:
            answers[index], _ = _split_answer(rx, question, decoded, options, times)
            advance(f"rate:{budget}")
    result = items.result(f"rate:{budget}", answers, payload_bytes=payloads)
    return {
        "target_bytes": budget,
        "accuracy": result.accuracy,
        "payload_bytes": _bytes_stats(payloads) if payloads else None,
        "images_without_a_fitting_codec": unreachable,
        "chosen": dict(sorted(chosen.items(), key=lambda kv: -kv[1])),
    }


def _run_image_codec(
    codec: ImageCodec | None,
    processor: Any,
    model: Any,
    stops: set[int],
    items: Items,
    options: GenerationOptions,
    advance: Advance,
) -> tuple[dict[str, Any], EvalResult, PathRecord]:
    """Cloud-only: (en/de)code the image, then the whole model on the server. None: the image as is."""
    name = codec.name if codec is not None else "original"
    record = PathRecord()
    answers = [""] * len(items.expected)
    sizes: list[int] = []
    if codec is not None:  # untimed warm-up (encoder initialisation)
        ImageCodec.decode(codec.encode(items.groups[0].image))
    for group in items.groups:
        t0 = time.perf_counter()
        data = codec.encode(group.image) if codec is not None else b""
        t1 = time.perf_counter()
        image = ImageCodec.decode(data) if codec is not None else group.image
        t2 = time.perf_counter()
        record.times.add("image_encode", (t1 - t0) * 1e3)
        record.times.add("image_decode", (t2 - t1) * 1e3)
        sizes.append(len(data) if codec is not None else group.image.width * group.image.height * 3)
        for index, question in group.items:
            s0 = time.perf_counter()
            inputs = unsplit_inputs(processor, [image], question)
            n = int(inputs["input_ids"].shape[1])
            with torch.inference_mode():
                out = model.generate(**inputs, **generation_kwargs(options))
            ids = truncate_at_stop(out[0, n:].tolist(), stops)
            answers[index] = normalize(processor.tokenizer.decode(ids, skip_special_tokens=True))
            server_ms = (time.perf_counter() - s0) * 1e3
            record.times.add("server_model", server_ms)
            record.tx_ms.append((t1 - t0) * 1e3)
            record.rx_ms.append((t2 - t1) * 1e3 + server_ms)
            record.uplink_bytes.append(sizes[-1] + len(question.encode()))
            advance(name)
    result = items.result(name, answers, payload_bytes=sizes)
    row = {
        "name": name,
        "format": codec.fmt if codec is not None else "RGB",
        "quality": codec.quality if codec is not None else 0,
        "image_bytes": _bytes_stats(sizes),
        "accuracy": result.accuracy,
        "per_type": result.per_type(),
        "timings_ms": record.times.summary(),
    }
    return row, result, record


def _validate_count(config: BenchConfig, n_images: int) -> int:
    return config.validate_requests or min(n_images, VALIDATE_MAX)


def _validate_link(
    config: BenchConfig, spec: str, items: Items, mbps: float, advance: Advance
) -> dict[str, Any]:
    """Ask the real services through the throttled proxy; compare with the latency model."""
    from rx_service.server import start_rx
    from shared.config import RxSettings, TxSettings
    from tx_service.client import TxClient
    from tx_service.server import start_tx

    rx = start_rx(
        RxSettings(
            model=config.model,
            grpc_port=0,
            http_port=0,
            split_point=config.split,
            codec_artifacts=list(config.codec_artifacts),
        ),
        http=False,
    )
    proxy = ThrottledProxy(rx.grpc_address, mbps=mbps, rtt_ms=config.rtt_ms)
    tx = None
    rows: list[dict[str, float]] = []
    try:
        tx = start_tx(
            TxSettings(
                model=config.model,
                port=0,
                rx_address=proxy.address,
                codec=spec,
                split_point=config.split,
                cache_bytes=0,
                codec_artifacts=list(config.codec_artifacts),
            ),
            require_rx=True,
            metrics=False,  # a measuring Tx: no /metrics port to collide with a running service
        )
        groups = items.groups
        n = _validate_count(config, len(groups))
        tx_keys = ("tx_preprocess", "tx_vision_encoder", "tx_codec_encode", "tx_serialize")
        rx_keys = ("rx_codec_decode", "rx_folded_decode", "rx_prefill", "rx_decode")
        with TxClient(tx.address) as client:

            def ask(group: Group) -> tuple[float, int, Any]:
                before = proxy.bytes_up
                start = time.perf_counter()
                answer = client.ask(
                    group.image, group.items[0][1], codec=spec, max_new_tokens=config.max_new_tokens
                )
                return (time.perf_counter() - start) * 1e3, proxy.bytes_up - before, answer

            ask(groups[0])  # warm-up
            for k in range(n):
                group = groups[k % len(groups)]
                # The same request on an unthrottled link first: what the link adds is the difference.
                proxy.set_link(math.inf, 0.0)
                direct_ms, _, direct = ask(group)
                direct_compute = sum(direct.timings_ms.get(key, 0.0) for key in tx_keys + rx_keys)
                proxy.set_link(mbps, config.rtt_ms)
                measured, up, answer = ask(group)
                ms = answer.timings_ms
                compute = sum(ms.get(key, 0.0) for key in tx_keys + rx_keys)
                link = config.rtt_ms + transfer_ms(up, mbps)
                rows.append(
                    {
                        "measured_ms": measured,
                        "modelled_ms": compute + link,
                        "compute_ms": compute,
                        "link_model_ms": link,
                        "unthrottled_ms": direct_ms,
                        # Each run's own reported compute taken out, so compute jitter between the
                        # two runs does not land in the link's share.
                        "link_measured_ms": (measured - compute) - (direct_ms - direct_compute),
                        "uplink_bytes": float(up),
                        "payload_bytes": float(answer.payload_bytes),
                    }
                )
                advance("throttled link")
    finally:
        if tx is not None:
            tx.stop()
        proxy.close()
        rx.stop()
    return _validation_summary(spec, mbps, config.rtt_ms, rows)


def _validate_cloud(
    config: BenchConfig,
    codec: ImageCodec,
    processor: Any,
    model: Any,
    stops: set[int],
    items: Items,
    mbps: float,
    advance: Advance,
) -> dict[str, Any]:
    """Cloud-only through the same kind of throttled link: the encoded image goes over TCP to a
    loopback server that decodes it and runs the whole model; compare with the latency model."""
    options = GenerationOptions(max_new_tokens=config.max_new_tokens)

    def handle(data: bytes, question: str) -> str:
        image = ImageCodec.decode(data)
        inputs = unsplit_inputs(processor, [image], question)
        n = int(inputs["input_ids"].shape[1])
        with torch.inference_mode():
            out = model.generate(**inputs, **generation_kwargs(options))
        return normalize(processor.tokenizer.decode(truncate_at_stop(out[0, n:].tolist(), stops)))

    server = UploadServer(handle)
    proxy = ThrottledProxy(server.address, mbps=mbps, rtt_ms=config.rtt_ms)
    client = UploadClient(proxy.address)
    rows: list[dict[str, float]] = []
    try:

        def ask(group: Group) -> tuple[float, int, float, float]:
            before = proxy.bytes_up
            start = time.perf_counter()
            data = codec.encode(group.image)
            encoded = time.perf_counter()
            _, server_ms = client.ask(data, group.items[0][1])
            end = time.perf_counter()
            return (end - start) * 1e3, proxy.bytes_up - before, (encoded - start) * 1e3, server_ms

        ask(items.groups[0])  # warm-up
        for k in range(_validate_count(config, len(items.groups))):
            group = items.groups[k % len(items.groups)]
            proxy.set_link(math.inf, 0.0)
            direct_ms, _, direct_encode, direct_server = ask(group)
            proxy.set_link(mbps, config.rtt_ms)
            measured, up, encode_ms, server_ms = ask(group)
            link = config.rtt_ms + transfer_ms(up, mbps)
            rows.append(
                {
                    "measured_ms": measured,
                    "modelled_ms": encode_ms + server_ms + link,
                    "compute_ms": encode_ms + server_ms,
                    "link_model_ms": link,
                    "unthrottled_ms": direct_ms,
                    "link_measured_ms": (measured - encode_ms - server_ms)
                    - (direct_ms - direct_encode - direct_server),
                    "uplink_bytes": float(up),
                    "payload_bytes": float(len(codec.encode(group.image))),
                }
            )
            advance("throttled link (cloud)")
    finally:
        client.close()
        proxy.close()
        server.close()
    return _validation_summary(codec.name, mbps, config.rtt_ms, rows)


def _validation_summary(
    spec: str, mbps: float, rtt_ms: float, rows: list[dict[str, float]]
) -> dict[str, Any]:
    modelled = [r["modelled_ms"] for r in rows]
    diffs = [r["measured_ms"] - r["modelled_ms"] for r in rows]
    return {
        "spec": spec,
        "mbps": mbps,
        "rtt_ms": rtt_ms,
        "requests": len(rows),
        "measured_ms": summary([r["measured_ms"] for r in rows]),
        "modelled_ms": summary(modelled),
        "difference_ms": summary(diffs),
        "difference_pct": 100.0 * median(diffs) / median(modelled),
        "uplink_bytes": summary([r["uplink_bytes"] for r in rows]),
        "unthrottled_ms": summary([r["unthrottled_ms"] for r in rows]),
        "link_measured_ms": summary([r["link_measured_ms"] for r in rows]),
        "link_model_ms": summary([r["link_model_ms"] for r in rows]),
        "link_difference_ms": summary([r["link_measured_ms"] - r["link_model_ms"] for r in rows]),
        "rows": rows,
    }


def _pick_best(rows: list[dict[str, Any]], target: float, size_key: str) -> dict[str, Any] | None:
    ok = [r for r in rows if r["accuracy"] >= target - 1e-9]
    return min(ok, key=lambda r: r[size_key]["mean"]) if ok else None


def run_bench(
    config: BenchConfig, on_progress: Callable[[str, int, int], None] | None = None
) -> dict[str, Any]:
    """Run everything; returns the results (see `shared.bench.report` for the files)."""
    from shared.models.registry import resolve_model

    started = time.perf_counter()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    if not config.image_codecs or not config.bandwidths:
        raise SplitVlmError("the bench needs at least one image codec and one bandwidth")
    folder = resolve_model(config.model)
    artifacts = artifacts_for(config.model, folder, config.codec_artifacts)
    tx = load_tx_half(folder, config.split)
    rx = load_rx_half(folder, config.split)
    processor, unsplit = load_unsplit(folder)
    stops = stop_token_ids(unsplit, processor.tokenizer)
    image_processor = getattr(tx, "image_processor", None)
    size = input_size(image_processor)
    items = load_items(config, size, center_crops(image_processor))
    options = GenerationOptions(max_new_tokens=config.max_new_tokens)
    codecs = list(dict.fromkeys([REFERENCE_CODEC, *config.codecs]))
    n_items, n_images = len(items.expected), len(items.groups)
    validate_n = 2 * _validate_count(config, n_images) if config.validate else 0
    total = n_images + n_items * (len(codecs) + len(config.image_codecs) + len(config.target_bytes) + 1)
    total += validate_n
    done = [0]

    def advance(what: str) -> None:
        done[0] += 1
        if on_progress is not None:
            on_progress(what, done[0], total)

    # Warm-up (first-call allocations, lazy init) so it does not land in the timings.
    warm = items.groups[0]
    with torch.inference_mode():
        warm_feats = tx.encode(tx.preprocess([warm.image]))
    rx.generate(warm.items[0][1], warm_feats, options)
    unsplit.generate(
        **unsplit_inputs(processor, [warm.image], warm.items[0][1]), **generation_kwargs(options)
    )

    feats, vision_times, front_ms = _vision_pass(tx, items, advance)
    leading = rx.leading_linear() if rx.codec_support.fold_linear else None
    fold = FoldCache(leading) if leading is not None else None

    codec_rows: list[dict[str, Any]] = []
    split_results: dict[str, EvalResult] = {}
    split_records: dict[str, PathRecord] = {}
    skipped: dict[str, str] = {}
    for spec in codecs:
        try:
            row, result, record = _run_codec(
                spec, tx, rx, items, feats, front_ms, options, config.split, fold, artifacts, advance
            )
        except CodecError as e:
            skipped[spec] = str(e)
            for _ in range(n_items):
                advance(spec)
            continue
        codec_rows.append(row)
        split_results[spec], split_records[spec] = result, record
    if REFERENCE_CODEC not in split_results:
        raise SplitVlmError(f"the reference codec {REFERENCE_CODEC!r} failed: {skipped.get(REFERENCE_CODEC)}")
    lossless = split_results[REFERENCE_CODEC]
    # The same input images as JPEG q75 at the model's input size: the everyday image yardstick.
    jpeg75 = sum(len(JPEG_YARDSTICK.encode(g.image)) for g in items.groups) / n_images
    for row in codec_rows:
        res = split_results[row["spec"]]
        row["agreement_with_lossless"] = res.agreement(lossless)
        row["points_vs_lossless"] = 100 * (res.accuracy - lossless.accuracy)
        row["ratio_vs_jpeg75"] = row["payload_bytes"]["mean"] / jpeg75
        t = row["timings_ms"]
        row["overhead"] = {
            "encode_over_vision_encoder": t["codec_encode"]["median"] / vision_times.median("vision_encoder"),
            "decode_over_prefill": t["codec_decode"]["median"] / t["prefill"]["median"],
        }

    rate_rows: list[dict[str, Any]] = []
    if config.target_bytes:
        measured = artifacts.ladder()
        family = type(rx).__name__

        def accept(codec: Any) -> None:
            check_codec_support(codec, rx.codec_support, family, token_scores=tx.token_scores)

        rate = (
            RateController(measured=measured, artifacts=artifacts, accept=accept)
            if measured is not None
            else RateController(usable_ladder(accept=accept))
        )
        for budget in config.target_bytes:
            rate_rows.append(_run_rate(budget, rate, rx, items, feats, options, advance))
            rate_rows[-1]["ladder"] = "measured" if measured is not None else "default"

    image_rows: list[dict[str, Any]] = []
    image_results: dict[str, EvalResult] = {}
    image_records: dict[str, PathRecord] = {}
    for icodec in [None, *config.image_codecs]:
        row, result, record = _run_image_codec(icodec, processor, unsplit, stops, items, options, advance)
        image_rows.append(row)
        image_results[row["name"]], image_records[row["name"]] = result, record
    original = image_results["original"]
    for row in image_rows:
        row["agreement_with_unsplit"] = image_results[row["name"]].agreement(original)
        row["agreement_with_lossless_split"] = image_results[row["name"]].agreement(lossless)

    # Findings.
    target = lossless.accuracy - ACCURACY_SLACK
    best_split = _pick_best(codec_rows, target, "payload_bytes")
    assert best_split is not None  # lossless itself qualifies
    compressed = [r for r in image_rows if r["name"] != "original"]
    best_image = _pick_best(compressed, target, "image_bytes")
    cloud_row = best_image or max(compressed, key=lambda r: (r["accuracy"], -r["image_bytes"]["mean"]))
    split_cost = split_records[best_split["spec"]].cost(best_split["spec"])
    cloud_cost = image_records[cloud_row["name"]].cost(cloud_row["name"])
    bandwidths = [float(b) for b in config.bandwidths]
    curves = {
        "bandwidths_mbps": bandwidths,
        "rtt_ms": config.rtt_ms,
        "split": {
            "name": split_cost.name,
            **vars(split_cost),
            "latency_ms": split_cost.curve(bandwidths, config.rtt_ms),
        },
        "cloud": {
            "name": cloud_cost.name,
            **vars(cloud_cost),
            "latency_ms": cloud_cost.curve(bandwidths, config.rtt_ms),
        },
        "all_split": {s: split_records[s].cost(s).curve(bandwidths, config.rtt_ms) for s in split_records},
        "crossover_mbps": crossover_mbps(split_cost, cloud_cost),
    }
    overheads = {}
    for row in codec_rows:
        o = row["overhead"]
        overheads[row["spec"]] = {
            **o,
            "encode_ok": o["encode_over_vision_encoder"] <= OVERHEAD_TARGET,
            "decode_ok": o["decode_over_prefill"] <= OVERHEAD_TARGET,
        }

    validation = validation_cloud = None
    if config.validate:
        mbps = config.validate_mbps or min(bandwidths)
        validation = _validate_link(config, best_split["spec"], items, mbps, advance)
        validation["predicted_ms_from_bench"] = split_cost.latency_ms(mbps, config.rtt_ms)
        cloud_codec = next(c for c in config.image_codecs if c.name == cloud_row["name"])
        validation_cloud = _validate_cloud(
            config, cloud_codec, processor, unsplit, stops, items, mbps, advance
        )
        validation_cloud["predicted_ms_from_bench"] = cloud_cost.latency_ms(mbps, config.rtt_ms)

    return {
        "meta": {
            "model": config.model,
            "model_folder": str(folder),
            "split": config.split.value,
            "items": items.source,
            "n_images": n_images,
            "n_questions": n_items,
            "has_answers": items.has_answers,
            "input_size": list(size) if size else None,
            "jpeg75_bytes_mean": jpeg75,
            "max_new_tokens": config.max_new_tokens,
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "stages_ms": vision_times.summary(),
        "codecs": codec_rows,
        "skipped_codecs": skipped,
        "rate_control": rate_rows,
        "image_baselines": image_rows,
        "latency": curves,
        "validation": validation,
        "validation_cloud": validation_cloud,
        "findings": {
            "accuracy_target": target,
            "lossless_accuracy": lossless.accuracy,
            "unsplit_accuracy": original.accuracy,
            "best_split": {k: best_split[k] for k in ("spec", "payload_bytes", "accuracy", "ratio_vs_fp16")},
            "image_for_same_accuracy": (
                {k: best_image[k] for k in ("name", "image_bytes", "accuracy")} if best_image else None
            ),
            "image_over_split_bytes": (
                best_image["image_bytes"]["mean"] / best_split["payload_bytes"]["mean"]
                if best_image
                else None
            ),
            "crossover_mbps": curves["crossover_mbps"],
            "overhead_target": OVERHEAD_TARGET,
            "overheads": overheads,
            "target_preset": TARGET_PRESET,
        },
        "seconds": time.perf_counter() - started,
    }
