"""Idefics3 / SmolVLM split adapter against the unsplit Hugging Face path.

Tiny random checkpoints (`shared.models.tiny_idefics3`) for equivalence, errors and layouts;
the real SmolVLM-256M-Instruct config, tokenizer and processor (random weights, 1 layer per
tower) for the real image tiling and prompt expansion.
"""

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

from shared.errors import BadRequestError, ModelError
from shared.models.tiny_idefics3 import (
    IMAGE_SEQ_LEN,
    PATCHES_PER_TILE,
    SMOLVLM_256M_DIR,
    TEXT_HIDDEN,
    VISION_HIDDEN,
    build_smolvlm_random,
    build_tiny_idefics3,
)
from shared.split import (
    GenerationOptions,
    SplitPoint,
    VisionFeatures,
    adapter_for,
    load_rx_half,
    load_tx_half,
)
from shared.split.idefics3 import Idefics3RxHalf, Idefics3TxHalf
from shared.split.reference import load_unsplit, unsplit_generate, unsplit_inputs

NEW_TOKENS = 8
PROMPT = "Describe the image."


def _images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(7)
    tall = np.zeros((100, 40, 3), dtype=np.uint8)
    tall[..., 1] = np.linspace(0, 255, 100, dtype=np.uint8)[:, None]
    tall[..., 2] = np.linspace(255, 0, 40, dtype=np.uint8)[None, :]
    return {
        "wide": Image.fromarray(rng.integers(0, 256, (40, 120, 3), dtype=np.uint8)),  # 1x3 tiles + global
        "tall": Image.fromarray(tall),  # 3x2 + global
        "square": Image.new("RGB", (50, 50), (200, 30, 40)),  # 3x3 + global
        "gray": Image.new("L", (70, 60), 90),  # non-RGB
    }


IMAGES = _images()
# (case id, image names, expected (rows, cols) per image for the splitting tiny model)
CASES = [
    ("wide", ["wide"], [(1, 3)]),
    ("tall", ["tall"], [(3, 2)]),
    ("two_images", ["square", "gray"], [(3, 3), (3, 3)]),
]
ARCHS = ["idefics3", "smolvlm"]  # smolvlm: SmolVLMForConditionalGeneration, no image splitting


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("idefics3")
    return {
        "idefics3": build_tiny_idefics3(root / "idefics3"),
        "smolvlm": build_tiny_idefics3(root / "smolvlm", architecture="smolvlm", image_splitting=False),
    }


@pytest.fixture(scope="module")
def reference(folders: dict[str, Path]) -> dict[tuple[str, str], tuple[list[int], torch.Tensor]]:
    """Unsplit token ids and processor input_ids for every (architecture, case)."""
    out = {}
    for arch, folder in folders.items():
        processor, _ = load_unsplit(folder)
        for case_id, names, _ in CASES:
            images = [IMAGES[n] for n in names]
            ids = unsplit_generate(folder, images, PROMPT, GenerationOptions(max_new_tokens=NEW_TOKENS))
            out[arch, case_id] = (ids, unsplit_inputs(processor, images, PROMPT)["input_ids"])
    return out


@pytest.fixture(
    scope="module",
    params=[(a, sp) for a in ARCHS for sp in SplitPoint],
    ids=lambda p: f"{p[0]}-{p[1].value}",
)
def halves(
    request: pytest.FixtureRequest, folders: dict[str, Path]
) -> tuple[str, Idefics3TxHalf, Idefics3RxHalf]:
    arch, split_point = request.param
    tx = load_tx_half(folders[arch], split_point)
    rx = load_rx_half(folders[arch], split_point)
    assert isinstance(tx, Idefics3TxHalf) and isinstance(rx, Idefics3RxHalf)
    return arch, tx, rx


# --------------------------------------------------------------------------------------------
# Equivalence with the unsplit model


def test_split_generation_matches_unsplit(halves, reference) -> None:
    arch, tx, rx = halves
    per_tile = IMAGE_SEQ_LEN if rx.split_point is SplitPoint.AFTER_PROJECTOR else PATCHES_PER_TILE
    outputs = []
    for case_id, names, grids in CASES:
        features = tx.encode(tx.preprocess([IMAGES[n] for n in names]))
        if arch == "smolvlm":
            grids = [(0, 0)] * len(names)
        tiles = [r * c + 1 if r else 1 for r, c in grids]
        assert features.meta == {
            "tokens_per_image": [t * per_tile for t in tiles],
            "image_rows": [r for r, _ in grids],
            "image_cols": [c for _, c in grids],
            "tiles_per_image": tiles,
            "tokens_per_tile": [per_tile] * len(names),
        }, case_id
        assert features.features.shape == (sum(tiles) * per_tile, rx.feature_dim)
        assert tx.feature_dim == rx.feature_dim

        ref_ids, ref_input_ids = reference[arch, case_id]
        assert torch.equal(rx.build_inputs(PROMPT, features)["input_ids"], ref_input_ids), case_id
        streamed: list[int] = []
        ids = rx.generate(PROMPT, features, GenerationOptions(max_new_tokens=NEW_TOKENS), streamed.append)
        assert len(ref_ids) == NEW_TOKENS, "the tiny model must not stop early, or this test proves little"
        assert ids == ref_ids, case_id
        assert streamed == ids
        assert rx.decode_tokens(ids).strip()
        outputs.append(tuple(ids))
    assert len(set(outputs)) == len(outputs)  # the answers depend on the image


def test_features_match_get_image_features(folders: dict[str, Path]) -> None:
    folder = folders["idefics3"]
    processor, model = load_unsplit(folder)
    inputs = unsplit_inputs(processor, [IMAGES["wide"], IMAGES["square"]], PROMPT)
    with torch.inference_mode():
        out = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"]
        )
    for split_point, expected in [
        (SplitPoint.AFTER_VISION_TOWER, out.last_hidden_state.flatten(0, 1)),
        (SplitPoint.AFTER_PROJECTOR, torch.cat(list(out.pooler_output))),
    ]:
        tx = load_tx_half(folder, split_point)
        pixels = tx.preprocess([IMAGES["wide"], IMAGES["square"]])
        assert torch.equal(pixels["pixel_values"], inputs["pixel_values"])
        assert torch.equal(tx.encode(pixels).features, expected), split_point


@pytest.mark.parametrize("split_point", list(SplitPoint), ids=lambda sp: sp.value)
def test_over_grpc(folders: dict[str, Path], reference, split_point: SplitPoint, tmp_path: Path) -> None:
    from rx_service.server import start_rx
    from shared.config import RxSettings, TxSettings
    from tx_service.client import TxClient
    from tx_service.server import start_tx

    folder = folders["idefics3"]
    rx = start_rx(
        RxSettings(model=str(folder), split_point=split_point, grpc_port=0, http_port=0, cache_dir=tmp_path),
        http=False,
    )
    try:
        tx = start_tx(
            TxSettings(
                model=str(folder),
                split_point=split_point,
                port=0,
                rx_address=rx.grpc_address,
                cache_dir=tmp_path,
            ),
            require_rx=True,
        )
        try:
            with TxClient(tx.address) as client:
                answer = client.ask(IMAGES["tall"], PROMPT, codec="lossless", max_new_tokens=NEW_TOKENS)
        finally:
            tx.stop()
    finally:
        rx.stop()
    assert answer.token_ids == reference["idefics3", "tall"][0]


# --------------------------------------------------------------------------------------------
# The real SmolVLM-256M-Instruct processor (image splitting, chat template, tokenizer)


@pytest.fixture(scope="module")
def smolvlm_256m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (SMOLVLM_256M_DIR / "config.json").is_file():
        pytest.skip(f"SmolVLM-256M-Instruct config/processor files not found at {SMOLVLM_256M_DIR}")
    return build_smolvlm_random(tmp_path_factory.mktemp("smolvlm256m"), text_layers=1, vision_layers=1)


def test_real_smolvlm_prompt_and_generation(smolvlm_256m: Path) -> None:
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (150, 300, 3), dtype=np.uint8))
    tx = load_tx_half(smolvlm_256m, SplitPoint.AFTER_VISION_TOWER)
    rx = load_rx_half(smolvlm_256m, SplitPoint.AFTER_VISION_TOWER)
    assert isinstance(tx, Idefics3TxHalf) and isinstance(rx, Idefics3RxHalf)
    features = tx.encode(tx.preprocess([image]))
    # 300x150 → longest edge 2048 → 2x4 tiles of 512 px + the global tile; 32x32 patches each.
    assert features.meta["image_rows"] == [2] and features.meta["image_cols"] == [4]
    assert features.features.shape == (9 * 1024, 768)
    assert rx.codec_support.token_reduction is False and "pixel-shuffle" in rx.codec_support.reason

    processor, _ = load_unsplit(smolvlm_256m)
    expected = unsplit_inputs(processor, [image], PROMPT)["input_ids"]
    built = rx.build_inputs(PROMPT, features)
    assert torch.equal(built["input_ids"], expected)
    tokens = processor.tokenizer.convert_ids_to_tokens(expected[0].tolist())
    assert tokens.count("<image>") == 9 * 64
    assert "<row_2_col_4>" in tokens and "<global-img>" in tokens
    assert "<row_3_col_1>" not in tokens

    options = GenerationOptions(max_new_tokens=3)
    ids = rx.generate(PROMPT, features, options)
    assert len(ids) == 3
    assert ids == unsplit_generate(smolvlm_256m, [image], PROMPT, options)

    # The Tx holds the vision model alone: 1 layer here, so compare with the full model's parts.
    _, full = load_unsplit(smolvlm_256m)
    vision = sum(p.numel() for p in full.model.vision_model.parameters())
    assert tx.num_parameters() == vision < 0.5 * sum(p.numel() for p in full.parameters())


# --------------------------------------------------------------------------------------------
# What each half holds, what the Rx accepts


def test_tx_half_holds_no_language_model(folders: dict[str, Path]) -> None:
    folder = folders["idefics3"]
    _, full = load_unsplit(folder)
    full_state = full.state_dict()
    for split_point in SplitPoint:
        tx = load_tx_half(folder, split_point)
        assert isinstance(tx, Idefics3TxHalf)
        names = [name for m in tx.torch_modules() for name, _ in m.named_modules()]
        assert not any("text_model" in n or "lm_head" in n or "embed_tokens" in n for n in names)
        assert (tx.connector is not None) == (split_point is SplitPoint.AFTER_PROJECTOR)
        parts = [("model.vision_model.", tx.vision_model)]
        if tx.connector is not None:
            parts.append(("model.connector.", tx.connector))
        for prefix, module in parts:  # exactly the checkpoint's tensors
            for key, value in module.state_dict().items():
                assert torch.equal(value, full_state[prefix + key]), prefix + key
        expected_dim = TEXT_HIDDEN if split_point is SplitPoint.AFTER_PROJECTOR else VISION_HIDDEN
        assert tx.feature_dim == expected_dim


def test_rx_half_and_codec_support(halves) -> None:
    _, _, rx = halves
    assert rx.model.model.vision_model is None
    after_projector = rx.split_point is SplitPoint.AFTER_PROJECTOR
    assert (rx.model.model.connector is None) == after_projector
    support = rx.codec_support
    assert not support.token_reduction and not support.fold_linear and rx.leading_linear() is None
    assert ("image_seq_len" if after_projector else "pixel-shuffle") in support.reason


def test_adapter_registration(folders: dict[str, Path]) -> None:
    for folder in folders.values():
        assert adapter_for(folder).module == "shared.split.idefics3"


def _meta(features: VisionFeatures, **changes: list[int]) -> VisionFeatures:
    return VisionFeatures(features.features, {**features.meta, **changes})


def test_bad_features_are_rejected(folders: dict[str, Path]) -> None:
    folder = folders["idefics3"]
    tx = load_tx_half(folder, SplitPoint.AFTER_VISION_TOWER)
    rx = load_rx_half(folder, SplitPoint.AFTER_VISION_TOWER)
    good = tx.encode(tx.preprocess([IMAGES["wide"]]))  # 1x3 + global = 4 tiles of 16 tokens
    assert rx.build_inputs("hi", good)["inputs_embeds"].shape[-1] == TEXT_HIDDEN

    bad = {
        "feature dim 33": VisionFeatures(torch.zeros(64, VISION_HIDDEN + 1), dict(good.meta)),
        "2-D": VisionFeatures(good.features[None], dict(good.meta)),
        "60 tokens .* says 64": VisionFeatures(good.features[:60], dict(good.meta)),
        # A grid that gives more tiles than the features hold.
        r"tiles_per_image \[4\] .* expected \[7\]": _meta(good, image_rows=[2]),
        "features have 64 tokens .* says 112": _meta(
            good, image_rows=[2], tiles_per_image=[7], tokens_per_image=[112]
        ),
        r"tokens_per_tile \[4\]": _meta(good, tokens_per_tile=[4]),
        "tokens_per_image": _meta(good, tokens_per_image=[32, 32]),
        "equally long": _meta(good, image_cols=[3, 1]),
        "grid 1x0": _meta(good, image_cols=[0]),
        "grid 1x9": _meta(good, image_cols=[9]),
        "lacks image_rows": VisionFeatures(good.features, {"tokens_per_image": [64]}),
    }
    for match, features in bad.items():
        with pytest.raises(BadRequestError, match=match):
            rx.build_inputs("hi", features)
    with pytest.raises(BadRequestError, match="image placeholder"):
        rx.build_inputs("look: <image>", good)
    with pytest.raises(BadRequestError, match="feature dim"):
        rx.generate("hi", bad["feature dim 33"], GenerationOptions(max_new_tokens=2))


# --------------------------------------------------------------------------------------------
# Checkpoints


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_checkpoint_is_deterministic(folders: dict[str, Path], tmp_path: Path) -> None:
    again = build_tiny_idefics3(tmp_path / "again")
    assert _sha256(again / "model.safetensors") == _sha256(folders["idefics3"] / "model.safetensors")
    config = json.loads((again / "config.json").read_text())
    assert config["architectures"] == ["Idefics3ForConditionalGeneration"]
    smol = json.loads((folders["smolvlm"] / "config.json").read_text())
    assert smol["architectures"] == ["SmolVLMForConditionalGeneration"]


def _rewrite(src: Path, dst: Path, rename, shards: int = 1, drop: str | None = None) -> Path:
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    state = {rename(k): v for k, v in load_file(src / "model.safetensors").items()}
    state = {k: v for k, v in state.items() if not (drop and drop in k)}
    if shards == 1:
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
        return dst
    keys, weight_map = sorted(state), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, dst / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_checkpoint_layouts(folders: dict[str, Path], tmp_path: Path) -> None:
    tiny = folders["idefics3"]
    keys = set(load_file(tiny / "model.safetensors"))
    assert any(k.startswith("model.vision_model.") for k in keys)  # what transformers 5 writes
    pixels = load_tx_half(tiny).preprocess([IMAGES["tall"]])
    variants = {
        "bare_model": _rewrite(tiny, tmp_path / "bare", lambda k: k.removeprefix("model.")),
        "sharded": _rewrite(tiny, tmp_path / "sharded", lambda k: k, shards=3),
    }
    for split_point in SplitPoint:
        expected = load_tx_half(tiny, split_point).encode(pixels).features
        for name, folder in variants.items():
            got = load_tx_half(folder, split_point).encode(pixels).features
            assert torch.equal(got, expected), (name, split_point)

    no_connector = _rewrite(tiny, tmp_path / "noconn", lambda k: k, drop="connector.")
    load_tx_half(no_connector, SplitPoint.AFTER_VISION_TOWER)  # does not need the connector
    with pytest.raises(ModelError, match="no connector weights"):
        load_tx_half(no_connector, SplitPoint.AFTER_PROJECTOR)
