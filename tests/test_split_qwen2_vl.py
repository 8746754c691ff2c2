"""Qwen2-VL / Qwen2.5-VL split adapter against the unsplit Hugging Face path, on tiny random checkpoints."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from shared.errors import BadRequestError
from shared.models.tiny_qwen2_vl import (
    MERGE_SIZE,
    TEXT_HIDDEN,
    VISION_HIDDEN,
    build_tiny_qwen_vl,
)
from shared.split import (
    GenerationOptions,
    SplitPoint,
    VisionFeatures,
    adapter_for,
    load_rx_half,
    load_tx_half,
)
from shared.split.qwen2_vl import QwenVLRxHalf, QwenVLTxHalf
from shared.split.reference import load_unsplit, unsplit_generate, unsplit_inputs

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
NEW_TOKENS = 8
PROMPT = "Describe the image."


def _images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(7)
    tall = np.zeros((120, 40, 3), dtype=np.uint8)
    tall[..., 1] = np.linspace(0, 255, 120, dtype=np.uint8)[:, None]
    return {
        "noise": Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)),
        "tall": Image.fromarray(tall),
        "solid": Image.new("RGB", (50, 70), (200, 30, 40)),
    }


IMAGES = _images()
# (case id, image names, prompt)
CASES = [
    ("noise", ["noise"], PROMPT),
    ("tall", ["tall"], "what color is it?"),
    ("two_images", ["noise", "solid"], "compare the two images"),
]


def _grids(features: VisionFeatures) -> list[tuple[int, int, int]]:
    flat = features.meta["image_grid_thw"]
    return [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-qwen")
    return {family: build_tiny_qwen_vl(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def reference(folders: dict[str, Path]) -> dict[tuple[str, str], tuple[list[int], dict[str, torch.Tensor]]]:
    """Unsplit token ids and processor outputs per (family, case)."""
    out = {}
    for family, folder in folders.items():
        processor, _ = load_unsplit(folder)
        for case_id, names, prompt in CASES:
            images = [IMAGES[n] for n in names]
            ids = unsplit_generate(folder, images, prompt, GenerationOptions(max_new_tokens=NEW_TOKENS))
            out[family, case_id] = (ids, unsplit_inputs(processor, images, prompt))
    return out


@pytest.fixture(
    scope="module",
    params=[(f, sp) for f in FAMILIES for sp in SplitPoint],
    ids=lambda p: f"{p[0]}-{p[1].value}",
)
def halves(
    request: pytest.FixtureRequest, folders: dict[str, Path]
) -> tuple[str, QwenVLTxHalf, QwenVLRxHalf]:
    family, split_point = request.param
    tx = load_tx_half(folders[family], split_point)
    rx = load_rx_half(folders[family], split_point)
    assert isinstance(tx, QwenVLTxHalf) and isinstance(rx, QwenVLRxHalf)
    return family, tx, rx


# --------------------------------------------------------------------------------------------
# Equivalence with the unsplit model


def test_split_generation_matches_unsplit(halves, reference) -> None:
    family, tx, rx = halves
    per_row = 1 if rx.split_point is SplitPoint.AFTER_VISION_TOWER else MERGE_SIZE**2
    outputs = []
    for case_id, names, prompt in CASES:
        ref_ids, ref_inputs = reference[family, case_id]
        features = tx.encode(tx.preprocess([IMAGES[n] for n in names]))
        grids = ref_inputs["image_grid_thw"].tolist()
        assert features.meta["image_grid_thw"] == [v for g in grids for v in g]
        assert features.tokens_per_image == [t * h * w // per_row for t, h, w in grids]
        assert features.features.shape == (sum(features.tokens_per_image), rx.feature_dim)

        built = rx.build_inputs(prompt, features)
        assert torch.equal(built["input_ids"], ref_inputs["input_ids"]), case_id
        assert torch.equal(built["mm_token_type_ids"], ref_inputs["mm_token_type_ids"]), case_id
        assert torch.equal(built["image_grid_thw"], ref_inputs["image_grid_thw"]), case_id

        streamed: list[int] = []
        ids = rx.generate(prompt, features, GenerationOptions(max_new_tokens=NEW_TOKENS), streamed.append)
        assert len(ref_ids) == NEW_TOKENS, "the tiny model must not stop early, or this test proves little"
        assert ids == ref_ids, (family, case_id)
        assert streamed == ids
        assert rx.decode_tokens(ids).strip()
        outputs.append(tuple(ids))
    assert len(set(outputs)) == len(outputs)  # the answers depend on the images


def test_sampling_matches_unsplit(halves, folders: dict[str, Path]) -> None:
    family, tx, rx = halves
    image = IMAGES["tall"]
    options = GenerationOptions(max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=40, seed=7)
    features = tx.encode(tx.preprocess([image]))
    ids = rx.generate("tell me", features, options)
    assert ids == unsplit_generate(folders[family], [image], "tell me", options)
    assert ids == rx.generate("tell me", features, options)  # the seed makes it repeatable


@pytest.mark.parametrize("family", FAMILIES)
def test_features_match_the_vision_model(folders: dict[str, Path], family: str) -> None:
    """after_projector = get_image_features; after_vision_tower = the merger's input, in processor order."""
    folder = folders[family]
    processor, model = load_unsplit(folder)
    inputs = unsplit_inputs(processor, [IMAGES["noise"], IMAGES["solid"]], "x")
    pixel_values, grid_thw = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.inference_mode():
        vision_out = model.model.visual(pixel_values, grid_thw=grid_thw)
    merged = vision_out.pooler_output
    blocks_out = vision_out.last_hidden_state  # what the merger consumes (window order for 2.5)

    pixel_inputs = {"pixel_values": pixel_values, "image_grid_thw": grid_thw}
    assert torch.equal(load_tx_half(folder, SplitPoint.AFTER_PROJECTOR).encode(pixel_inputs).features, merged)

    features = load_tx_half(folder, SplitPoint.AFTER_VISION_TOWER).encode(pixel_inputs)
    assert features.features.shape == (int(grid_thw.prod(-1).sum()), VISION_HIDDEN)
    unit = MERGE_SIZE**2
    if family == "qwen2_5_vl":
        from transformers.vision_utils import get_vision_window_index

        vision = model.config.vision_config
        window_index, _ = get_vision_window_index(grid_thw, MERGE_SIZE, vision.window_size, vision.patch_size)
        assert not torch.equal(window_index, torch.arange(len(window_index)))  # windows do reorder
        in_order = blocks_out.reshape(-1, unit, VISION_HIDDEN)[torch.argsort(window_index)]
        assert torch.equal(features.features, in_order.reshape(-1, VISION_HIDDEN))
    else:
        assert torch.equal(features.features, blocks_out)

    rx = load_rx_half(folder, SplitPoint.AFTER_VISION_TOWER)
    assert isinstance(rx, QwenVLRxHalf)
    with torch.inference_mode():
        assert torch.equal(rx._merge(features.features, _grids(features)), merged)
        # Processor order is a valid merge order: each row of 4 patches is one merge group.
        assert rx.merger is not None
        assert torch.allclose(rx.merger(features.features), merged, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Over gRPC


@pytest.mark.parametrize(
    ("family", "split_point"),
    [("qwen2_5_vl", SplitPoint.AFTER_VISION_TOWER), ("qwen2_vl", SplitPoint.AFTER_PROJECTOR)],
    ids=["qwen2_5_vl-after_vision_tower", "qwen2_vl-after_projector"],
)
def test_over_grpc(folders, reference, tmp_path: Path, family: str, split_point: SplitPoint) -> None:
    from rx_service.server import start_rx
    from shared.config import RxSettings, TxSettings
    from tx_service.client import TxClient
    from tx_service.server import start_tx

    folder = str(folders[family])
    rx = start_rx(
        RxSettings(model=folder, split_point=split_point, grpc_port=0, http_port=0, cache_dir=tmp_path),
        http=False,
    )
    try:
        tx = start_tx(
            TxSettings(
                model=folder, split_point=split_point, port=0, rx_address=rx.grpc_address, cache_dir=tmp_path
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
    assert answer.token_ids == reference[family, "noise"][0]


# --------------------------------------------------------------------------------------------
# What each half holds, what it declares


@pytest.mark.parametrize("family", FAMILIES)
def test_tx_half_holds_no_language_model(folders: dict[str, Path], family: str) -> None:
    _, full = load_unsplit(folders[family])
    full_params = sum(p.numel() for p in full.parameters())
    for split_point in SplitPoint:
        tx = load_tx_half(folders[family], split_point)
        assert isinstance(tx, QwenVLTxHalf)
        names = [name for m in tx.torch_modules() for name, _ in m.named_modules()]
        assert not any("language_model" in n or "lm_head" in n or "embed_tokens" in n for n in names)
        has_merger = any(name.startswith("merger.mlp") for name, _ in tx.visual.named_parameters())
        assert has_merger == (split_point is SplitPoint.AFTER_PROJECTOR)
        assert tx.num_parameters() < 0.35 * full_params
        assert tx.feature_dim == (TEXT_HIDDEN if split_point is SplitPoint.AFTER_PROJECTOR else VISION_HIDDEN)


def test_rx_half_holds_no_vision_blocks_and_declares_codec_support(halves) -> None:
    _, tx, rx = halves
    assert rx.model.model.visual is None
    assert (rx.merger is None) == (rx.split_point is SplitPoint.AFTER_PROJECTOR)
    assert rx.feature_dim == tx.feature_dim
    assert not rx.codec_support.token_reduction and not rx.codec_support.fold_linear
    assert "image_grid_thw" in rx.codec_support.reason and "norm" in rx.codec_support.reason
    assert rx.leading_linear() is None


def test_adapter_registry(folders: dict[str, Path]) -> None:
    for folder in folders.values():
        assert adapter_for(folder).module == "shared.split.qwen2_vl"


# --------------------------------------------------------------------------------------------
# Errors


def test_bad_features_are_rejected(halves) -> None:
    _, tx, rx = halves
    good = tx.encode(tx.preprocess([IMAGES["solid"], IMAGES["tall"]]))
    grid = good.meta["image_grid_thw"]
    tpi = good.meta["tokens_per_image"]

    def changed(index: int, delta: int) -> list[int]:
        out = list(grid)
        out[index] += delta
        return out

    def bad(match: str, features: torch.Tensor | None = None, prompt: str = "hi", **meta: list[int]) -> None:
        f = VisionFeatures(good.features if features is None else features, {**good.meta, **meta})
        with pytest.raises(BadRequestError, match=match):
            rx.build_inputs(prompt, f)

    # The grid disagrees with the features or with tokens_per_image.
    bad("tokens_per_image .* does not match image_grid_thw", image_grid_thw=changed(2, 2))
    bad("tokens_per_image .* does not match", tokens_per_image=[tpi[0] + 1, tpi[1] - 1])
    without_tpi = VisionFeatures(good.features, {"image_grid_thw": changed(5, 2)})
    with pytest.raises(BadRequestError, match=r"features have \d+ tokens but image_grid_thw .* gives"):
        rx.build_inputs("hi", without_tpi)
    bad(r"\(t, h, w\) per image", image_grid_thw=grid[:-1])
    bad("must be positive", image_grid_thw=changed(0, -1))
    bad("not a multiple of the spatial merge size", image_grid_thw=changed(1, 1))
    with pytest.raises(BadRequestError, match="lack the image_grid_thw"):
        rx.build_inputs("hi", VisionFeatures(good.features, {"tokens_per_image": tpi}))
    # Shapes and the prompt.
    bad(f"feature dim {rx.feature_dim + 1} .* {rx.feature_dim}", features=torch.zeros(5, rx.feature_dim + 1))
    bad("tokens", features=good.features[:-1])
    bad("2-D", features=good.features[None])
    bad("placeholder", prompt="look: <|image_pad|>")
    with pytest.raises(BadRequestError, match="image_grid_thw must be"):
        tx.encode({"pixel_values": torch.zeros(4, 384)})


# --------------------------------------------------------------------------------------------
# Checkpoint layouts and determinism


def _rewrite(src: Path, dst: Path, rename, shards: int = 1) -> Path:
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    state = {rename(k): v for k, v in load_file(src / "model.safetensors").items()}
    keys = sorted(state)
    if shards == 1:
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
        return dst
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, dst / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _in_memory_name(key: str) -> str:
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    return key


def test_checkpoint_layouts(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = folders["qwen2_5_vl"]
    keys = set(load_file(folder / "model.safetensors"))
    assert any(k.startswith("visual.merger.") for k in keys)  # what transformers 5 writes
    variants = {
        "in_memory": _rewrite(folder, tmp_path / "mem", _in_memory_name),
        "sharded": _rewrite(folder, tmp_path / "sharded", lambda k: k, shards=3),
    }
    pixels = load_tx_half(folder).preprocess([IMAGES["tall"]])
    for split_point in SplitPoint:
        expected = load_tx_half(folder, split_point).encode(pixels).features
        for name, variant in variants.items():
            got = load_tx_half(variant, split_point).encode(pixels).features
            assert torch.equal(got, expected), (name, split_point)


def test_tiny_checkpoint_is_deterministic(folders: dict[str, Path], tmp_path: Path) -> None:
    again = build_tiny_qwen_vl(tmp_path / "again", "qwen2_vl")

    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert sha(again / "model.safetensors") == sha(folders["qwen2_vl"] / "model.safetensors")
    config = json.loads((again / "config.json").read_text())
    assert config["architectures"] == ["Qwen2VLForConditionalGeneration"]
