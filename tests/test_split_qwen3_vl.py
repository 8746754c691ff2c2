"""Qwen3-VL split adapter against the unsplit Hugging Face path, on a tiny random Qwen3-VL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from shared.errors import BadRequestError
from shared.models.tiny_qwen3_vl import (
    DEEPSTACK_VISUAL_INDEXES,
    MERGE_SIZE,
    TEXT_HIDDEN,
    VISION_HIDDEN,
    build_tiny_qwen3_vl,
)
from shared.split import (
    GenerationOptions,
    SplitPoint,
    VisionFeatures,
    adapter_for,
    load_rx_half,
    load_tx_half,
)
from shared.split.qwen3_vl import Qwen3VLRxHalf, Qwen3VLTxHalf
from shared.split.reference import load_unsplit, unsplit_generate, unsplit_inputs

NEW_TOKENS = 8
LEVELS = len(DEEPSTACK_VISUAL_INDEXES)
PROMPT = "Describe the image."


def _images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(1234)
    gradient = np.zeros((100, 40, 3), dtype=np.uint8)
    gradient[..., 0] = np.linspace(0, 255, 100, dtype=np.uint8)[:, None]
    gradient[..., 1] = np.linspace(255, 0, 40, dtype=np.uint8)[None, :]
    return {
        "noise": Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)),  # grid 6 x 10
        "solid": Image.new("RGB", (64, 64), (200, 30, 40)),  # grid 8 x 8
        "tall": Image.fromarray(gradient),  # grid 12 x 4
    }


IMAGES = _images()
GRIDS = {"noise": [1, 6, 10], "solid": [1, 8, 8], "tall": [1, 12, 4]}
# (case id, image names, prompt)
CASES = [
    ("noise", ["noise"], PROMPT),
    ("solid", ["solid"], "Is it red? Answer yes or no."),
    ("two_images", ["tall", "noise"], "compare the two images"),
]


def _patches(names: list[str]) -> list[int]:
    return [int(np.prod(GRIDS[n])) for n in names]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3vl") / "tiny-qwen3-vl")


@pytest.fixture(scope="module")
def reference(tiny: Path) -> dict[str, tuple[list[int], dict[str, torch.Tensor]]]:
    """Unsplit token ids and processor outputs for every case."""
    processor, _ = load_unsplit(tiny)
    out = {}
    for case_id, names, prompt in CASES:
        images = [IMAGES[n] for n in names]
        ids = unsplit_generate(tiny, images, prompt, GenerationOptions(max_new_tokens=NEW_TOKENS))
        out[case_id] = (ids, unsplit_inputs(processor, images, prompt))
    return out


@pytest.fixture(scope="module", params=list(SplitPoint), ids=lambda sp: sp.value)
def halves(request: pytest.FixtureRequest, tiny: Path) -> tuple[Qwen3VLTxHalf, Qwen3VLRxHalf]:
    tx = load_tx_half(tiny, request.param)
    rx = load_rx_half(tiny, request.param)
    assert isinstance(tx, Qwen3VLTxHalf) and isinstance(rx, Qwen3VLRxHalf)
    return tx, rx


def _dim(split_point: SplitPoint) -> int:
    return (1 + LEVELS) * (VISION_HIDDEN if split_point is SplitPoint.AFTER_VISION_TOWER else TEXT_HIDDEN)


# --------------------------------------------------------------------------------------------
# Equivalence with the unsplit model


def test_split_generation_matches_unsplit(halves, reference) -> None:
    tx, rx = halves
    assert adapter_for(rx.folder).family == "qwen3_vl"
    outputs = []
    for case_id, names, prompt in CASES:
        images = [IMAGES[n] for n in names]
        features = tx.encode(tx.preprocess(images))
        patches = _patches(names)
        rows = (
            patches
            if tx.split_point is SplitPoint.AFTER_VISION_TOWER
            else [p // MERGE_SIZE**2 for p in patches]
        )
        assert features.features.shape == (sum(rows), _dim(tx.split_point)) == (sum(rows), rx.feature_dim)
        assert features.meta == {
            "tokens_per_image": rows,
            "image_grid_thw": [v for n in names for v in GRIDS[n]],
            "deepstack_levels": list(DEEPSTACK_VISUAL_INDEXES),
        }

        ref_ids, ref_inputs = reference[case_id]
        built = rx.build_inputs(prompt, features)
        assert torch.equal(built["input_ids"], ref_inputs["input_ids"]), case_id
        assert torch.equal(built["mm_token_type_ids"], ref_inputs["mm_token_type_ids"]), case_id
        assert torch.equal(built["image_grid_thw"], ref_inputs["image_grid_thw"]), case_id

        streamed: list[int] = []
        ids = rx.generate(prompt, features, GenerationOptions(max_new_tokens=NEW_TOKENS), streamed.append)
        assert len(ref_ids) == NEW_TOKENS, "the tiny model must not stop early, or this test proves little"
        assert ids == ref_ids, case_id
        assert streamed == ids
        assert rx.decode_tokens(ids).strip()
        outputs.append(tuple(ids))
    assert len(set(outputs)) == len(outputs)  # the answers depend on the image


def test_sampling_matches_unsplit(halves, tiny: Path) -> None:
    tx, rx = halves
    image = IMAGES["tall"]
    options = GenerationOptions(max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=40, seed=7)
    ids = rx.generate("tell me", tx.encode(tx.preprocess([image])), options)
    assert ids == unsplit_generate(tiny, [image], "tell me", options)


def test_features_match_get_image_features(tiny: Path) -> None:
    """Tx (after_projector) and Rx mergers (after_vision_tower) reproduce `get_image_features` bit for bit."""
    processor, model = load_unsplit(tiny)
    inputs = unsplit_inputs(processor, [IMAGES["tall"], IMAGES["solid"]], "x")
    pixels = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
    with torch.inference_mode():
        ref = model.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"])
    expected = [torch.cat(ref.pooler_output)] + [torch.cat(level) for level in ref.deepstack_features]
    assert len(expected) == 1 + LEVELS

    projected = load_tx_half(tiny, SplitPoint.AFTER_PROJECTOR).encode(pixels).features
    assert torch.equal(projected, torch.cat(expected, dim=-1))

    raw = load_tx_half(tiny, SplitPoint.AFTER_VISION_TOWER).encode(pixels)
    rx = load_rx_half(tiny, SplitPoint.AFTER_VISION_TOWER)
    assert isinstance(rx, Qwen3VLRxHalf)
    got = rx.image_encoder_outputs(raw.features, [n // MERGE_SIZE**2 for n in raw.tokens_per_image])
    assert torch.equal(torch.cat(got.pooler_output), expected[0])
    for level, want in zip(got.deepstack_features, expected[1:], strict=True):
        assert torch.equal(torch.cat(level), want)


def _last_logits(rx: Qwen3VLRxHalf, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        return rx.model(**inputs).logits[0, -1]


def test_deepstack_matters(halves) -> None:
    """The deepstack part of the features reaches the language model and changes its output."""
    tx, rx = halves
    features = tx.encode(tx.preprocess([IMAGES["noise"]]))
    logits = _last_logits(rx, rx.build_inputs(PROMPT, features))

    zeroed = features.features.clone()
    zeroed[:, features.features.shape[1] // (1 + LEVELS) :] = 0
    zeroed_logits = _last_logits(rx, rx.build_inputs(PROMPT, VisionFeatures(zeroed, dict(features.meta))))
    assert (zeroed_logits - logits).abs().max() > 0.05

    inputs = rx.build_inputs(PROMPT, features)
    inputs["mm_encoder_outputs"]["image"].deepstack_features = []  # no deepstack injection at all
    assert (_last_logits(rx, inputs) - logits).abs().max() > 0.05

    options = GenerationOptions(max_new_tokens=NEW_TOKENS)
    ids = rx.generate(PROMPT, features, options)
    # The language model sees the deepstack features in the prefill only, not while decoding.
    seen: list[object] = []

    def record(_module: torch.nn.Module, _args: tuple, kwargs: dict) -> None:
        seen.append(kwargs.get("deepstack_visual_embeds"))

    handle = rx.model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        assert rx.generate(PROMPT, features, options) == ids
    finally:
        handle.remove()
    assert len(seen) == NEW_TOKENS
    first = seen[0]
    assert isinstance(first, list) and len(first) == LEVELS
    tokens = features.tokens_per_image[0] // (
        MERGE_SIZE**2 if rx.split_point is SplitPoint.AFTER_VISION_TOWER else 1
    )
    assert all(tuple(level.shape) == (tokens, TEXT_HIDDEN) for level in first)
    assert all(s is None for s in seen[1:])


# --------------------------------------------------------------------------------------------
# What each half holds


def test_tx_half_holds_no_language_model(tiny: Path) -> None:
    _, full = load_unsplit(tiny)
    full_params = sum(p.numel() for p in full.parameters())
    merger_params = sum(
        p.numel()
        for n, p in full.model.visual.named_parameters()
        if n.startswith(("merger.", "deepstack_merger"))
    )
    for split_point in SplitPoint:
        tx = load_tx_half(tiny, split_point)
        assert isinstance(tx, Qwen3VLTxHalf)
        names = [name for m in tx.torch_modules() for name, _ in m.named_modules()]
        assert not any("language_model" in n or "lm_head" in n or "embed_tokens" in n for n in names)
        vision_params = sum(p.numel() for p in full.model.visual.parameters())
        if split_point is SplitPoint.AFTER_PROJECTOR:
            assert tx.num_parameters() == vision_params
        else:  # the mergers stay on the Rx
            assert tx.num_parameters() == vision_params - merger_params
        assert tx.num_parameters() < 0.5 * full_params
        assert tx.feature_dim == _dim(split_point)


def test_rx_half_holds_no_vision_blocks(halves) -> None:
    _, rx = halves
    assert rx.model.model.visual is None
    has_mergers = rx.merger is not None and rx.deepstack_mergers is not None
    assert has_mergers == (rx.split_point is SplitPoint.AFTER_VISION_TOWER)
    support = rx.codec_support
    assert not support.token_reduction and not support.fold_linear
    assert "merge" in support.reason and "Linear" in support.reason
    assert rx.leading_linear() is None


# --------------------------------------------------------------------------------------------
# Errors


def test_bad_features_are_rejected(halves) -> None:
    tx, rx = halves
    good = tx.encode(tx.preprocess([IMAGES["solid"]]))
    x, meta = good.features, good.meta

    def bad(features: torch.Tensor = x, **changes: list[int] | None) -> VisionFeatures:
        new = {k: v for k, v in {**meta, **changes}.items() if v is not None}
        return VisionFeatures(features, new)

    cases: list[tuple[VisionFeatures, str, str]] = [
        (bad(torch.zeros(x.shape[0], rx.feature_dim + 1)), "hi", rf"feature dim {rx.feature_dim + 1} "),
        (bad(x[:-4], tokens_per_image=None), "hi", "features have"),
        (bad(x[None]), "hi", "2-D"),
        (bad(x.to(torch.int32)), "hi", "floating point"),
        (bad(image_grid_thw=None), "hi", "image_grid_thw must be"),
        (bad(image_grid_thw=[1, 8]), "hi", "image_grid_thw must be"),
        (bad(image_grid_thw=[1, 8, 7]), "hi", "merge size"),
        (bad(image_grid_thw=[0, 8, 8]), "hi", "positive grid"),
        (bad(image_grid_thw=[1, 6, 10]), "hi", "tokens_per_image .* does not match"),
        (bad(image_grid_thw=[1, 6, 10], tokens_per_image=None), "hi", "features have"),
        (bad(tokens_per_image=[x.shape[0] - 1]), "hi", "tokens_per_image"),
        (bad(deepstack_levels=None), "hi", "deepstack_levels"),
        (bad(deepstack_levels=[0, 2]), "hi", "deepstack_levels"),
        (good, "look: <|image_pad|>", "placeholder"),
        (good, "look: <|video_pad|>", "placeholder"),
    ]
    for features, prompt, match in cases:
        with pytest.raises(BadRequestError, match=match):
            rx.build_inputs(prompt, features)
    # The count of features must follow the grid; a consistent pair with another grid is fine.
    other = tx.encode(tx.preprocess([IMAGES["noise"]]))
    assert len(rx.generate("hi", other, GenerationOptions(max_new_tokens=2))) == 2


# --------------------------------------------------------------------------------------------
# The checkpoint, its layouts and the MoE variant


def test_tiny_checkpoint_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = build_tiny_qwen3_vl(tmp_path / "again")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "processor_config.json"):
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert config["vision_config"]["deepstack_visual_indexes"] == list(DEEPSTACK_VISUAL_INDEXES)
    assert json.loads((tiny / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"
    assert "random" in (tiny / "README.md").read_text().lower()


def test_checkpoint_layouts(tiny: Path, tmp_path: Path) -> None:
    state = load_file(tiny / "model.safetensors")
    assert any(k.startswith("model.visual.") for k in state)  # what transformers 5 writes
    hub = tmp_path / "hub"
    shutil.copytree(tiny, hub)
    (hub / "model.safetensors").unlink()
    renamed = {(k[len("model.") :] if k.startswith("model.visual.") else k): v for k, v in state.items()}
    keys = sorted(renamed)
    weight_map = {}
    for i in range(2):  # sharded, with the original hub prefix ``visual.``
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: renamed[k] for k in keys[i::2]}, hub / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys[i::2], name))
    (hub / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    pixels = load_tx_half(tiny).preprocess([IMAGES["tall"]])
    for split_point in SplitPoint:
        expected = load_tx_half(tiny, split_point).encode(pixels).features
        assert torch.equal(load_tx_half(hub, split_point).encode(pixels).features, expected)


def test_moe_variant(tmp_path: Path) -> None:
    folder = build_tiny_qwen3_vl(tmp_path / "moe", moe=True)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen3_vl_moe"
    images = [IMAGES["noise"]]
    options = GenerationOptions(max_new_tokens=NEW_TOKENS)
    ref = unsplit_generate(folder, images, PROMPT, options)
    assert len(ref) == NEW_TOKENS
    for split_point in SplitPoint:
        tx, rx = load_tx_half(folder, split_point), load_rx_half(folder, split_point)
        assert rx.generate(PROMPT, tx.encode(tx.preprocess(images)), options) == ref


# --------------------------------------------------------------------------------------------
# Over real gRPC


@pytest.mark.parametrize("split_point", list(SplitPoint), ids=lambda sp: sp.value)
def test_grpc_loopback(split_point: SplitPoint, tiny: Path, reference, tmp_path: Path) -> None:
    from rx_service.server import start_rx
    from shared.config import RxSettings, TxSettings
    from tx_service.client import TxClient
    from tx_service.server import start_tx

    rx = start_rx(
        RxSettings(model=str(tiny), split_point=split_point, grpc_port=0, http_port=0, cache_dir=tmp_path),
        http=False,
    )
    try:
        tx = start_tx(
            TxSettings(
                model=str(tiny),
                split_point=split_point,
                port=0,
                rx_address=rx.grpc_address,
                cache_dir=tmp_path,
            ),
            require_rx=True,
        )
        try:
            with TxClient(tx.address) as client:
                answer = client.ask(IMAGES["noise"], PROMPT, codec="lossless", max_new_tokens=NEW_TOKENS)
        finally:
            tx.stop()
    finally:
        rx.stop()
    assert answer.token_ids == reference["noise"][0]
