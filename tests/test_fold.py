"""Compressed-domain decoding: pca and sparse decoders folded into LLaVA's projector linear_1
(shared.codecs.fold)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from shared.codecs import build_codec
from shared.codecs.calibrate import collect_features, fit_stages, synthetic_images
from shared.codecs.calibration import CalibrationArtifact
from shared.codecs.fold import CompactCode, FoldCache, flops, fold
from shared.errors import CodecError
from shared.split import GenerationOptions, VisionFeatures, features_for_codec

MODEL = "builtin:tiny-llava"
PCA = "pca:k=16|int8|zstd"
SPARSE = "sparse:atoms=64,k=8|int8|zstd"
KMEANS = "kmeans:bits=2|zstd"  # calibrated, but its decoder is a table look-up: not foldable
SPECS = [PCA, SPARSE]
# Codecs whose decode is not a linear map of what they send: they decode normally with folding on.
UNFOLDABLE = ["int8", "svd:r=4|fp16|zstd", "pool:2|int8|zstd", KMEANS]
PROMPT = "What is in the image?"


@pytest.fixture(scope="module")
def calibration(cache_dir: Path, model_dir: Path) -> tuple[list[torch.Tensor], str]:
    return collect_features(MODEL, synthetic_images(6), cache_dir=cache_dir)


@pytest.fixture(scope="module")
def artifacts(calibration: tuple[list[torch.Tensor], str]) -> dict[str, CalibrationArtifact]:
    features, fingerprint = calibration
    return {
        spec: fit_stages(spec, features, model=MODEL, model_fingerprint=fingerprint)
        for spec in (*SPECS, KMEANS)
    }


@pytest.fixture(scope="module")
def halves(model_dir: Path) -> tuple[Any, Any]:
    from shared.split import load_rx_half, load_tx_half

    return load_tx_half(model_dir), load_rx_half(model_dir)


def _codec(spec: str, artifacts: dict[str, CalibrationArtifact]) -> Any:
    return build_codec(spec, artifact=artifacts.get(spec))


def _both_ways(codec: Any, rx: Any, features: VisionFeatures) -> tuple[VisionFeatures, VisionFeatures]:
    """(decoded features, pre-projected features from the folded decoder) for one payload."""
    payload = codec.encode(features.features)
    shape = tuple(features.features.shape)
    decoded = codec.decode(payload, shape, features.features.dtype)
    code, decoder = codec.decode_compact(payload, shape, features.features.dtype)
    with torch.inference_mode():
        h = fold(decoder, rx.leading_linear())(code)
    return (
        VisionFeatures(features=decoded, meta=features.meta),
        VisionFeatures(features=h, meta=features.meta, pre_projected=True),
    )


def _projector_output(rx: Any, features: VisionFeatures) -> torch.Tensor:
    """What the projector hands the language model (linear_1 → act → linear_2)."""
    projector = rx.projector
    with torch.inference_mode():
        x = features.features.to(rx.dtype)
        if features.pre_projected:
            return projector.linear_2(projector.act(x)).double()
        return projector(x).double()


def _first_logits(rx: Any, features: VisionFeatures) -> torch.Tensor:
    inputs = rx.build_inputs(PROMPT, features)
    with torch.inference_mode():
        out = rx.model(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"])
        return out.logits[0, -1].double()


def _relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("spec", SPECS)
def test_decode_compact_is_decode_before_its_linear_map(
    spec: str, artifacts: dict[str, CalibrationArtifact]
) -> None:
    codec = _codec(spec, artifacts)
    w, b = codec.linear_decoder()
    x = torch.randn(10, w.shape[1])
    payload = codec.encode(x)
    code, (w2, b2) = codec.decode_compact(payload, tuple(x.shape))
    assert torch.equal(w, w2) and torch.equal(b, b2)
    assert code.values.dtype == torch.float32
    if spec == PCA:
        assert code.indices is None and code.values.shape == (10, 16) and w.shape[0] == 16
    else:
        assert w.shape[0] == 64  # one row per atom
        assert code.values.shape == (10, 8) and code.indices is not None and code.indices.shape == (10, 8)
        assert int(code.indices.min()) >= 0 and int(code.indices.max()) < 64
    decoded = codec.decode(payload, tuple(x.shape))
    torch.testing.assert_close(code.apply(w, b), decoded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(code.dense(w.shape[0]) @ w + b, decoded, rtol=1e-5, atol=1e-5)


def test_codecs_without_a_linear_decoder(artifacts: dict[str, CalibrationArtifact]) -> None:
    for spec in [*UNFOLDABLE, "fp16|zstd:3"]:
        codec = _codec(spec, artifacts)
        assert codec.linear_decoder() is None, spec
        with pytest.raises(CodecError, match="linear map"):
            codec.decode_compact(codec.encode(torch.randn(16, 64)), (16, 64))


def test_fold_equals_decode_then_linear() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(8, 32, generator=g), torch.randn(32, generator=g)
    dense = CompactCode(torch.randn(5, 8, generator=g))
    sparse = CompactCode(torch.randn(5, 3, generator=g), torch.randint(0, 8, (5, 3), generator=g))
    with torch.inference_mode():
        for lin in (torch.nn.Linear(32, 48), torch.nn.Linear(32, 48, bias=False)):
            folded = fold((w, b), lin)
            assert (folded.in_features, folded.out_features) == (8, 48)
            z = dense.values
            torch.testing.assert_close(folded(z), lin(z @ w + b), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(folded(dense), lin(z @ w + b), rtol=1e-5, atol=1e-5)
            # A sparse code gathers its rows: the same as the dense coefficient matrix it stands for.
            x = sparse.dense(8) @ w + b
            torch.testing.assert_close(sparse.apply(w, b), x, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(folded(sparse), lin(x), rtol=1e-5, atol=1e-5)
    assert flops(576, 64, 1024, 4096) == (576 * 64 * 1024 + 576 * 1024 * 4096, 576 * 64 * 4096)


def test_compact_code_check_rejects_bad_codes() -> None:
    values = torch.ones(4, 2)
    CompactCode(values, torch.zeros(4, 2, dtype=torch.long)).check(4, 8)
    with pytest.raises(CodecError, match=r"lie in \[0, 8\)"):
        CompactCode(values, torch.full((4, 2), 8, dtype=torch.long)).check(4, 8)
    with pytest.raises(CodecError, match=r"lie in \[0, 8\)"):
        CompactCode(values, torch.full((4, 2), -1, dtype=torch.long)).check(4, 8)
    with pytest.raises(CodecError, match="shape"):
        CompactCode(values).check(4, 8)  # dense needs one coefficient per row
    with pytest.raises(CodecError, match="NaN or Inf"):
        CompactCode(torch.full((4, 8), float("nan"))).check(4, 8)


@pytest.mark.parametrize("spec", SPECS)
def test_folded_projector_output_and_logits_match_decode_then_project(
    spec: str, artifacts: dict[str, CalibrationArtifact], halves: tuple[Any, Any], images: list
) -> None:
    tx, rx = halves
    assert rx.codec_support.fold_linear and rx.leading_linear() is not None
    codec = _codec(spec, artifacts)
    worst_projector = worst_logits = 0.0
    for image in images:
        features = tx.encode(tx.preprocess([image]))
        decoded, folded = _both_ways(codec, rx, features)
        worst_projector = max(
            worst_projector, _relative(_projector_output(rx, folded), _projector_output(rx, decoded))
        )
        worst_logits = max(worst_logits, _relative(_first_logits(rx, folded), _first_logits(rx, decoded)))
    print(f"{spec}: max relative error projector {worst_projector:.3e}, logits {worst_logits:.3e}")
    assert worst_projector < 1e-4, worst_projector
    assert worst_logits < 1e-4, worst_logits


@pytest.mark.parametrize("spec", SPECS)
def test_greedy_answers_are_identical_on_heldout_scenes(
    spec: str, artifacts: dict[str, CalibrationArtifact], halves: tuple[Any, Any]
) -> None:
    from shared.reference.evaluate import heldout_items

    tx, rx = halves
    codec = _codec(spec, artifacts)
    options = GenerationOptions(max_new_tokens=6)
    items = heldout_items(n_images=10, per_image=1)
    assert len(items) == 10
    for scene, qa in items:
        decoded, folded = _both_ways(codec, rx, tx.encode(tx.preprocess([scene.image])))
        assert rx.generate(qa.question, folded, options) == rx.generate(qa.question, decoded, options)


def test_pre_projected_features_need_the_projector_width(halves: tuple[Any, Any]) -> None:
    from shared.errors import BadRequestError

    _, rx = halves
    wrong = VisionFeatures(features=torch.zeros(4, rx.feature_dim + 1), pre_projected=True)
    with pytest.raises(BadRequestError, match="feature dim"):
        rx.build_inputs(PROMPT, wrong)


def test_fold_cache_reuses_per_fingerprint(
    artifacts: dict[str, CalibrationArtifact], halves: tuple[Any, Any]
) -> None:
    _, rx = halves
    cache = FoldCache(rx.leading_linear())
    pca, sparse = (cache.get(_codec(spec, artifacts)) for spec in SPECS)
    assert pca is not None and sparse is not None and pca is not sparse
    assert pca is cache.get(_codec(PCA, artifacts)) and sparse is cache.get(_codec(SPARSE, artifacts))
    assert sparse.weight.shape == (64, rx.leading_linear().out_features)  # folded atoms
    for spec in UNFOLDABLE:
        assert cache.get(_codec(spec, artifacts)) is None


@pytest.mark.parametrize("fold_decoder", [True, False])
def test_rx_engine_reports_which_path_ran(
    fold_decoder: bool,
    artifacts: dict[str, CalibrationArtifact],
    halves: tuple[Any, Any],
    cache_dir: Path,
    tmp_path: Path,
    images: list,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rx_service.engine import RxEngine
    from shared.config import RxSettings
    from shared.protocol.packet import build_header

    paths = []
    for i, artifact in enumerate(artifacts.values()):
        artifact.save(tmp_path / f"a{i}")
        paths.append(tmp_path / f"a{i}")
    monkeypatch.setenv("SPLITVLM_RX_FOLD_DECODER", "1" if fold_decoder else "0")
    # This test is about decoding paths, not the accepted-codec list: accept svd too.
    settings = RxSettings(cache_dir=cache_dir, codec_artifacts=paths, codecs=["any"])
    assert settings.fold_decoder is fold_decoder
    engine = RxEngine.load(settings)
    tx, _ = halves
    options = GenerationOptions(max_new_tokens=4)
    for spec in [*SPECS, *UNFOLDABLE]:
        codec = _codec(spec, artifacts)
        shape, features = features_for_codec(codec, tx.encode(tx.preprocess([images[2]])))
        payload = codec.encode(features.features)
        header = build_header(
            request_id=uuid.uuid4().hex,
            model_fingerprint=engine.fingerprint,
            split_point=engine.settings.split_point,
            codec_spec=codec.spec,
            codec_fingerprint=codec.fingerprint,
            features=features,
            payload=payload,
            shape=shape,
        )
        chunks = list(engine.generate(header, payload, PROMPT, options))
        timings = dict(chunks[-1].timings.ms)
        folded = fold_decoder and spec in SPECS
        assert ("rx_folded_decode" in timings) is folded, spec
        assert ("rx_codec_decode" in timings) is not folded, spec
        tokens = [t for c in chunks for t in c.token_ids]
        decoded = VisionFeatures(codec.decode(payload, shape, features.features.dtype), dict(features.meta))
        assert tokens == engine.half.generate(PROMPT, decoded, options), spec


def test_cli_fold_decoder_options_are_wired(
    monkeypatch: pytest.MonkeyPatch,
    cache_dir: Path,
    model_dir: Path,
    artifacts: dict[str, CalibrationArtifact],
    tmp_path: Path,
) -> None:
    import rx_service.server
    import shared.reference.evaluate
    from shared.cli import app
    from shared.errors import SplitVlmError
    from shared.reference.evaluate import EvalResult

    seen: dict[str, Any] = {}

    def fake_start_rx(settings: Any) -> None:
        seen["rx"] = settings.fold_decoder
        raise SplitVlmError("not starting in this test")

    def fake_split(folder: Path, items: Any, spec: str, *args: Any, **kwargs: Any) -> EvalResult:
        seen["eval"] = kwargs
        return EvalResult(name=spec, qtypes=[], expected=[], answers=[])

    monkeypatch.setattr(rx_service.server, "start_rx", fake_start_rx)
    monkeypatch.setattr(shared.reference.evaluate, "evaluate_split", fake_split)
    runner = CliRunner()
    for args, env, want in [
        (["--fold-decoder"], "0", True),
        (["--no-fold-decoder"], "1", False),
        ([], "0", False),  # no flag: SPLITVLM_RX_FOLD_DECODER decides
        ([], "1", True),
    ]:
        monkeypatch.setenv("SPLITVLM_RX_FOLD_DECODER", env)
        result = runner.invoke(app, ["rx", "serve", *args])
        assert result.exit_code == 2 and "not starting" in result.output, result.output
        assert seen.pop("rx") is want, args

    monkeypatch.delenv("SPLITVLM_RX_FOLD_DECODER")
    artifacts[PCA].save(tmp_path / "pca")
    base = ["eval", "--model", MODEL, "--no-unsplit", "--images", "1", "--codec", PCA]
    base += ["--codec-artifact", str(tmp_path / "pca")]
    for args, want in [(["--fold-decoder"], True), (["--no-fold-decoder"], False), ([], False)]:
        result = runner.invoke(app, [*base, *args])
        assert result.exit_code == 0, result.output
        kwargs = seen.pop("eval")
        assert kwargs["fold_decoder"] is want, args
        assert list(kwargs["artifacts"]) == [artifacts[PCA].spec]


def test_evaluate_split_folds_and_answers_alike(
    artifacts: dict[str, CalibrationArtifact], model_dir: Path
) -> None:
    from shared.reference.evaluate import evaluate_split, heldout_items

    items = heldout_items(n_images=3, per_image=2)
    art = artifacts[SPARSE]
    results = {
        fold_decoder: evaluate_split(
            model_dir, items, SPARSE, fold_decoder=fold_decoder, artifacts={art.spec: art}
        )
        for fold_decoder in (False, True)
    }
    assert results[True].name == f"{SPARSE} (folded)" and results[False].name == SPARSE
    assert results[True].answers == results[False].answers
    assert results[True].payload_bytes == results[False].payload_bytes
    # A codec that cannot be folded runs the normal decode even when asked to fold.
    assert evaluate_split(model_dir, items[:2], "int8", fold_decoder=True).name == "int8"
