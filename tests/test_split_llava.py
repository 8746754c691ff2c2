"""LLaVA split adapter against the unsplit Hugging Face path, on the built-in tiny random LLaVA."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from shared.errors import BadRequestError, ModelError
from shared.models.registry import model_fingerprint, resolve_model
from shared.models.tiny_llava import TEXT_HIDDEN, TOKENS_PER_IMAGE, VISION_HIDDEN, build_tiny_llava
from shared.split import (
    GenerationOptions,
    SplitPoint,
    VisionFeatures,
    load_rx_half,
    load_tx_half,
)
from shared.split.llava import LlavaRxHalf, LlavaTxHalf, truncate_at_stop
from shared.split.reference import load_unsplit, unsplit_generate, unsplit_inputs

TINY = "builtin:tiny-llava"
NEW_TOKENS = 12


def _images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(1234)
    gradient = np.zeros((64, 100, 3), dtype=np.uint8)
    gradient[..., 0] = np.linspace(0, 255, 100, dtype=np.uint8)[None, :]
    gradient[..., 2] = np.linspace(255, 0, 64, dtype=np.uint8)[:, None]
    return {
        "noise": Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)),
        "gradient": Image.fromarray(gradient),
        "solid": Image.new("RGB", (50, 70), (200, 30, 40)),
        "gray_large": Image.new("L", (300, 200), 90),  # non-RGB, larger than the model's input
    }


IMAGES = _images()
# (case id, image names, prompt)
CASES = [
    ("noise", ["noise"], "What is in this picture?"),
    ("gradient", ["gradient"], "describe the colors"),
    ("solid", ["solid"], "Is it red? Answer yes or no."),
    ("gray_large", ["gray_large"], "count the dots"),
    ("two_images", ["noise", "solid"], "compare the two images"),
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("splitvlm-cache")


@pytest.fixture(scope="session")
def tiny(cache_dir: Path) -> Path:
    """The built-in default model, generated through the registry into a temporary cache."""
    return resolve_model(TINY, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def reference(tiny: Path) -> dict[str, tuple[list[int], torch.Tensor]]:
    """Unsplit token ids and processor input_ids for every case."""
    processor, _ = load_unsplit(tiny)
    out = {}
    for case_id, names, prompt in CASES:
        images = [IMAGES[n] for n in names]
        ids = unsplit_generate(tiny, images, prompt, GenerationOptions(max_new_tokens=NEW_TOKENS))
        out[case_id] = (ids, unsplit_inputs(processor, images, prompt)["input_ids"])
    return out


@pytest.fixture(scope="session", params=list(SplitPoint), ids=lambda sp: sp.value)
def halves(request: pytest.FixtureRequest, tiny: Path) -> tuple[LlavaTxHalf, LlavaRxHalf]:
    tx = load_tx_half(tiny, request.param)
    rx = load_rx_half(tiny, request.param)
    assert isinstance(tx, LlavaTxHalf) and isinstance(rx, LlavaRxHalf)
    return tx, rx


# --------------------------------------------------------------------------------------------
# Equivalence with the unsplit model


def test_split_generation_matches_unsplit(halves, reference) -> None:
    tx, rx = halves
    outputs = []
    for case_id, names, prompt in CASES:
        images = [IMAGES[n] for n in names]
        features = tx.encode(tx.preprocess(images))
        assert features.tokens_per_image == [TOKENS_PER_IMAGE] * len(images)
        assert features.features.shape == (TOKENS_PER_IMAGE * len(images), rx.feature_dim)

        ref_ids, ref_input_ids = reference[case_id]
        built = rx.build_inputs(prompt, features)
        assert torch.equal(built["input_ids"], ref_input_ids), case_id
        assert built["inputs_embeds"].shape[:2] == ref_input_ids.shape

        streamed: list[int] = []
        ids = rx.generate(prompt, features, GenerationOptions(max_new_tokens=NEW_TOKENS), streamed.append)
        assert len(ref_ids) == NEW_TOKENS, "the tiny model must not stop early, or this test proves little"
        assert ids == ref_ids, case_id
        assert streamed == ids
        assert rx.decode_tokens(ids).strip()
        outputs.append(tuple(ids))
    # The answers depend on the image, so a wrong feature path cannot pass by accident.
    assert len(set(outputs)) == len(outputs)


def test_sampling_matches_unsplit(halves, tiny: Path) -> None:
    tx, rx = halves
    image = IMAGES["gradient"]
    options = GenerationOptions(max_new_tokens=8, temperature=0.8, top_p=0.9, top_k=40, seed=7)
    features = tx.encode(tx.preprocess([image]))
    ids = rx.generate("tell me", features, options)
    assert ids == unsplit_generate(tiny, [image], "tell me", options)
    assert ids == rx.generate("tell me", features, options)  # the seed makes it repeatable


def test_features_match_get_image_features(tiny: Path) -> None:
    processor, model = load_unsplit(tiny)
    pixel_values = unsplit_inputs(processor, [IMAGES["noise"], IMAGES["solid"]], "x")["pixel_values"]
    with torch.inference_mode():
        projected = torch.cat(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))
    tx = load_tx_half(tiny, SplitPoint.AFTER_PROJECTOR)
    got = tx.encode({"pixel_values": pixel_values}).features
    assert torch.equal(got, projected)


# --------------------------------------------------------------------------------------------
# The built-in model and the registry


def test_builtin_model_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = build_tiny_llava(tmp_path / "again")
    assert _sha256(again / "model.safetensors") == _sha256(tiny / "model.safetensors")
    assert model_fingerprint(again, cache_dir=tmp_path) == model_fingerprint(tiny, cache_dir=tmp_path)
    assert model_fingerprint(tiny, cache_dir=tmp_path).startswith("sha256:")
    cached = json.loads((tmp_path / "fingerprints.json").read_text())
    assert str((tiny / "model.safetensors").resolve()) in cached
    # Different weights, different fingerprint.
    other = build_tiny_llava(tmp_path / "seed1", seed=1)
    assert model_fingerprint(other, cache_dir=tmp_path) != model_fingerprint(tiny, cache_dir=tmp_path)


# Changing the generator changes these bytes: then also bump the builtin's folder name
# (tiny-llava-random-v1) so that caches built by older code are not mixed with new ones.
TINY_LLAVA_SHA256 = "8a1159209cc924ec3bc6b5ce4c74b1baeb1e8234a5162f4917e36fb3e0b1ac29"


def test_builtin_model_weights_are_pinned(tiny: Path) -> None:
    assert _sha256(tiny / "model.safetensors") == TINY_LLAVA_SHA256


def test_builtin_model_files(tiny: Path) -> None:
    assert (tiny / "model.safetensors").stat().st_size < 5_000_000
    assert "random" in (tiny / "README.md").read_text().lower()
    assert "meaningless" in (tiny / "splitvlm.json").read_text()
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]


def test_resolve_model_reuses_builtin_and_folders(tiny: Path, cache_dir: Path) -> None:
    mtime = (tiny / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(TINY, cache_dir=cache_dir) == tiny
    assert (tiny / "model.safetensors").stat().st_mtime_ns == mtime
    assert resolve_model(str(tiny)) == tiny.resolve()
    with pytest.raises(ModelError, match="unknown built-in"):
        resolve_model("builtin:nope", cache_dir=cache_dir)


def test_resolve_model_concurrent_first_use(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(resolve_model(TINY, cache_dir=tmp_path))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 2 and results[0] == results[1]
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == [
        "tiny-llava-random-v1"
    ]


def test_resolve_model_missing_hub_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match="not in the Hugging Face cache") as info:
        resolve_model("nobody-here/no-such-model", cache_dir=tmp_path)
    assert "nobody-here/no-such-model" in str(info.value)


def test_resolve_model_bad_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))


# --------------------------------------------------------------------------------------------
# What each half holds


def test_tx_half_holds_no_language_model(tiny: Path) -> None:
    _, full = load_unsplit(tiny)
    full_params = sum(p.numel() for p in full.parameters())
    for split_point in SplitPoint:
        tx = load_tx_half(tiny, split_point)
        assert isinstance(tx, LlavaTxHalf)
        names = [name for m in tx.torch_modules() for name, _ in m.named_modules()]
        assert not any("language_model" in n or "lm_head" in n or "embed_tokens" in n for n in names)
        assert (tx.projector is not None) == (split_point is SplitPoint.AFTER_PROJECTOR)
        assert tx.num_parameters() < 0.35 * full_params
        expected_dim = TEXT_HIDDEN if split_point is SplitPoint.AFTER_PROJECTOR else VISION_HIDDEN
        assert tx.feature_dim == expected_dim


def test_rx_half_holds_no_vision_tower(halves) -> None:
    _, rx = halves
    assert rx.model.model.vision_tower is None
    assert (rx.model.model.multi_modal_projector is None) == (rx.split_point is SplitPoint.AFTER_PROJECTOR)


# --------------------------------------------------------------------------------------------
# Errors


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    for load in (load_tx_half, load_rx_half):
        with pytest.raises(ModelError, match="BertModel") as info:
            load(tmp_path)
        assert "LlavaForConditionalGeneration" in str(info.value)


def test_bad_features_are_rejected(halves) -> None:
    tx, rx = halves
    good = tx.encode(tx.preprocess([IMAGES["solid"]]))
    options = GenerationOptions(max_new_tokens=2)
    wrong_dim = VisionFeatures(torch.zeros(TOKENS_PER_IMAGE, rx.feature_dim + 1), dict(good.meta))
    with pytest.raises(BadRequestError, match=f"feature dim {rx.feature_dim + 1} .* {rx.feature_dim}"):
        rx.generate("hi", wrong_dim, options)
    too_few = VisionFeatures(good.features[:-3], dict(good.meta))
    with pytest.raises(BadRequestError, match=f"{TOKENS_PER_IMAGE - 3} tokens .* sums to {TOKENS_PER_IMAGE}"):
        rx.build_inputs("hi", too_few)
    with pytest.raises(BadRequestError, match="2-D"):
        rx.build_inputs("hi", VisionFeatures(good.features[None], dict(good.meta)))
    with pytest.raises(BadRequestError, match="tokens_per_image"):
        rx.build_inputs("hi", VisionFeatures(good.features, {"tokens_per_image": [0, TOKENS_PER_IMAGE]}))
    with pytest.raises(BadRequestError, match="image placeholder"):
        rx.build_inputs("look: <image>", good)


def test_rx_accepts_any_token_count_and_dtype(halves) -> None:
    """The Rx expands each placeholder to the tokens that arrived (e.g. after token pruning)."""
    tx, rx = halves
    good = tx.encode(tx.preprocess([IMAGES["solid"], IMAGES["noise"]]))
    pruned = VisionFeatures(good.features[:100].half(), {"tokens_per_image": [40, 60]})
    built = rx.build_inputs("hi", pruned)
    assert int((built["input_ids"] == rx.image_token_id).sum()) == 100
    assert len(rx.generate("hi", pruned, GenerationOptions(max_new_tokens=3))) == 3


# --------------------------------------------------------------------------------------------
# Checkpoint layouts


def _rewrite(src: Path, dst: Path, rename, shards: int = 1, drop: str | None = None) -> Path:
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    state = {rename(k): v for k, v in load_file(src / "model.safetensors").items()}
    if drop:
        state = {k: v for k, v in state.items() if drop not in k}
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
    if key == "language_model.lm_head.weight":
        return "lm_head.weight"
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model.") :]
    return "model." + key


def test_checkpoint_layouts(tiny: Path, tmp_path: Path) -> None:
    keys = set(load_file(tiny / "model.safetensors"))
    assert any(k.startswith("vision_tower.") for k in keys)  # what transformers 5 writes
    pixels = load_tx_half(tiny).preprocess([IMAGES["gradient"]])
    variants = {
        # original hub layout of llava-hf checkpoints: CLIPVisionModel's inner `vision_model.`
        "hub": _rewrite(
            tiny, tmp_path / "hub", lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1)
        ),
        "in_memory": _rewrite(tiny, tmp_path / "mem", _in_memory_name),
        "sharded": _rewrite(tiny, tmp_path / "sharded", lambda k: k, shards=3),
    }
    for split_point in SplitPoint:
        expected = load_tx_half(tiny, split_point).encode(pixels).features
        for name, folder in variants.items():
            got = load_tx_half(folder, split_point).encode(pixels).features
            assert torch.equal(got, expected), (name, split_point)


def test_missing_tensors_are_reported(tiny: Path, tmp_path: Path) -> None:
    folder = _rewrite(tiny, tmp_path / "noproj", lambda k: k, drop="multi_modal_projector.linear_2")
    load_tx_half(folder, SplitPoint.AFTER_VISION_TOWER)  # does not need the projector
    with pytest.raises(ModelError, match=r"lacks projector tensors .*linear_2"):
        load_tx_half(folder, SplitPoint.AFTER_PROJECTOR)


def test_truncate_at_stop() -> None:
    assert truncate_at_stop([5, 6, 3, 7], {3}) == [5, 6]
    assert truncate_at_stop([5, 6], {3}) == [5, 6]
    assert truncate_at_stop([0, 5], {0, 3}) == []
