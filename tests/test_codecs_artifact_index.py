"""Calibration artifacts found without flags: the index keyed by (model fingerprint, canonical spec)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from shared.codecs import build_codec
from shared.codecs.artifacts import ARTIFACT_DIR, ArtifactIndex, artifacts_for, default_artifact_name
from shared.codecs.calibrate import build_codec_with, fit_stages
from shared.errors import CodecError, FingerprintMismatchError

MODEL_A = "sha256:" + "a" * 64
MODEL_B = "sha256:" + "b" * 64
PCA8 = "pca:k=8|int8|zstd:level=3"
PCA4 = "pca:k=4|int8|zstd:level=3"


def _features() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 32, generator=g) for _ in range(6)]


def _save(folder: Path, spec: str, fingerprint: str, model: str = "m") -> Path:
    art = fit_stages(spec, _features(), model=model, model_fingerprint=fingerprint)
    path = folder / ARTIFACT_DIR / default_artifact_name(art.spec, fingerprint)
    art.save(path)
    return path


def test_index_finds_this_models_artifacts_and_loads_lazily(tmp_path: Path) -> None:
    model_folder, cache = tmp_path / "model", tmp_path / "cache"
    shipped = _save(model_folder, PCA8, MODEL_A)
    _save(model_folder, PCA4, MODEL_B)  # another model's: indexed, never used
    index = ArtifactIndex.discover(MODEL_A, model="m", model_folder=model_folder, cache_dir=cache)
    assert index.specs() == [PCA8] and PCA4 not in index
    assert index._loaded == {}  # nothing loaded until asked
    art = index.get(PCA8)
    assert art is not None and art.model_fingerprint == MODEL_A
    assert index.entries[PCA8].path == shipped
    codec = build_codec_with("pca:k=8|int8|zstd", index)  # any spelling of the spec
    assert codec.fingerprint == build_codec(PCA8, artifact=art).fingerprint


def test_cache_dir_wins_over_the_shipped_artifact_and_explicit_wins_over_both(tmp_path: Path) -> None:
    model_folder, cache = tmp_path / "model", tmp_path / "cache"
    _save(model_folder, PCA8, MODEL_A, model="shipped")
    _save(cache, PCA8, MODEL_A, model="recalibrated")
    index = ArtifactIndex.discover(MODEL_A, model_folder=model_folder, cache_dir=cache)
    art = index.get(PCA8)
    assert art is not None and art.model == "recalibrated"
    explicit = fit_stages(PCA8, _features()[:3], model="explicit", model_fingerprint=MODEL_A)
    explicit.save(tmp_path / "mine")
    index = ArtifactIndex.discover(
        MODEL_A, model_folder=model_folder, cache_dir=cache, explicit=[tmp_path / "mine"]
    )
    art = index.get(PCA8)
    assert art is not None and art.model == "explicit"


def test_explicit_artifact_of_another_model_is_refused(tmp_path: Path) -> None:
    fit_stages(PCA8, _features(), model="other", model_fingerprint=MODEL_B).save(tmp_path / "x")
    with pytest.raises(FingerprintMismatchError, match="fitted on model other"):
        ArtifactIndex.discover(MODEL_A, explicit=[tmp_path / "x"])


def test_missing_artifact_explains_what_exists_and_the_command(tmp_path: Path) -> None:
    model_folder = tmp_path / "model"
    _save(model_folder, PCA4, MODEL_A)  # a neighbouring spec for this model
    foreign = _save(model_folder, PCA8, MODEL_B, model="other-model")  # this spec, another model
    index = ArtifactIndex.discover(MODEL_A, model="builtin:x", model_folder=model_folder)
    with pytest.raises(CodecError) as info:
        build_codec_with("pca:k=8|int8|zstd", index)
    msg = str(info.value)
    assert "needs a calibration artifact" in msg
    assert f"{foreign} is for this spec but was fitted on another model (other-model" in msg
    assert f"artifacts for this model exist for other specs: {PCA4}" in msg
    assert "splitvlm calibrate --model builtin:x --synthetic 256 --codec 'pca:k=8|int8|zstd:level=3'" in msg
    # A calibration-free spec needs no artifact.
    assert build_codec_with("int8", index).spec == build_codec("int8").spec


def test_garbage_json_in_an_artifact_folder_is_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "cache" / ARTIFACT_DIR
    folder.mkdir(parents=True)
    (folder / "junk.json").write_text("{not json")
    (folder / "other.json").write_text('{"format": "something-else"}')
    index = ArtifactIndex.discover(MODEL_A, cache_dir=tmp_path / "cache")
    assert len(index) == 0


def test_calibrate_without_out_is_found_by_the_services(
    tmp_path: Path, model_dir: Path, images: list
) -> None:
    """`splitvlm calibrate` with no --out writes under the cache dir; Tx and Rx find it, no flags."""
    from rx_service.server import start_rx
    from shared.cli import app
    from shared.config import RxSettings, TxSettings
    from tx_service.client import TxClient
    from tx_service.server import start_tx

    cache = tmp_path / "cache"
    spec = "pca:k=8|int8|zstd"
    result = CliRunner().invoke(
        app,
        ["calibrate", "--model", str(model_dir), "--synthetic", "4", "--codec", spec],
        env={"SPLITVLM_CACHE_DIR": str(cache)},
    )
    assert result.exit_code == 0, result.output
    written = sorted((cache / ARTIFACT_DIR).glob("*.json"))
    assert len(written) == 1 and written[0].name.startswith("pca-k-8-int8-zstd-level-3-")
    index = artifacts_for(str(model_dir), model_dir, cache_dir=cache)
    assert index.specs() == ["pca:k=8|int8|zstd:level=3"]

    rx = start_rx(RxSettings(model=str(model_dir), grpc_port=0, http_port=0, cache_dir=cache), http=False)
    tx: Any = None
    try:
        tx = start_tx(
            TxSettings(model=str(model_dir), port=0, rx_address=rx.grpc_address, cache_dir=cache),
            require_rx=True,
        )
        with TxClient(tx.address) as client:
            answer = client.ask(images[2], "What is there?", codec=spec, max_new_tokens=2)
        assert answer.codec_spec == "pca:k=8|int8|zstd:level=3" and answer.payload_bytes > 0
    finally:
        if tx is not None:
            tx.stop()
        rx.stop()
