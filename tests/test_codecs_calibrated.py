"""Calibrated and transform codec stages (pca, svd, kmeans, zstd dictionaries) and calibration artifacts."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from shared.codecs import build_codec
from shared.codecs.bitpack import pack_bits, packed_len, unpack_bits
from shared.codecs.calibrate import fit_stages
from shared.codecs.calibration import CalibrationArtifact
from shared.errors import CodecError, PacketTooLargeError

DIM = 32


def _features(n: int, tokens: int = 24, dim: int = DIM, seed: int = 0, rank: int = 6) -> list[torch.Tensor]:
    """Low-rank-ish features sharing one subspace (as a vision encoder's do), plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=torch.Generator().manual_seed(1234))
    return [
        torch.randn(tokens, rank, generator=g) @ basis + 0.05 * torch.randn(tokens, dim, generator=g) + 0.3
        for _ in range(n)
    ]


TRAIN = _features(16)
TEST = _features(4, seed=99)

_ARTIFACTS: dict[str, CalibrationArtifact] = {}


def _artifact(spec: str) -> CalibrationArtifact:
    if spec not in _ARTIFACTS:
        _ARTIFACTS[spec] = fit_stages(spec, TRAIN, model="test", model_fingerprint="sha256:" + "0" * 64)
    return _ARTIFACTS[spec]


SPARSE = "sparse:atoms=16,k=4"
AE = "ae:dim=8,hidden=32"


def _first_stage_artifact(spec: str) -> CalibrationArtifact:
    """An artifact for `spec` reusing the fitted first stage of ``<first stage>|int8|zstd``."""
    first = spec.split("|")[0]
    source = _artifact(f"{first}|int8|zstd")
    canonical = build_codec(f"{first}|int8|zstd", artifact=source).stages[0].spec
    rest = "|".join(build_codec(part).spec if part != "raw" else "raw" for part in spec.split("|")[1:])
    tensors = {k: v for k, v in source.tensors.items() if k.startswith("0.")}
    return CalibrationArtifact(spec=f"{canonical}|{rest}", tensors=tensors, stages=source.stages[:1])


def _codec(spec: str) -> Any:
    return build_codec(spec, artifact=_artifact(spec))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())


# ---- PCA -------------------------------------------------------------------------------------


def test_pca_with_k_equal_to_dim_reconstructs_exactly() -> None:
    codec = _codec(f"pca:k={DIM}|zstd")
    for x in TEST:
        y = codec.decode(codec.encode(x), x.shape)
        assert torch.allclose(y, x, atol=1e-5, rtol=0), float((y - x).abs().max())


def test_pca_decoder_is_the_exposed_linear_map() -> None:
    codec = _codec("pca:k=8|raw")
    stage = codec.stages[0]
    w, b = stage.linear_decoder()
    assert w.shape == (8, DIM) and b.shape == (DIM,)
    x = TEST[0]
    z = (x - b) @ w.T
    assert torch.allclose(codec.decode(codec.encode(x), x.shape), z @ w + b, atol=1e-5)
    # Orthonormal rows: the encoder is the decoder's transpose.
    assert torch.allclose(w @ w.T, torch.eye(8), atol=1e-5)


@pytest.mark.parametrize(
    "spec",
    [
        "pca:k=8|int8|zstd",
        "pca:k=8|fp16|zstd",
        "svd:r=6|fp16|zstd",
        "svd:r=6|int8",
        "kmeans:bits=4|zstd",
        f"{SPARSE}|int8|zstd",
        f"{AE}|int8|zstd",
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shapes_and_dtypes_survive(spec: str, dtype: torch.dtype) -> None:
    codec = build_codec(spec, artifact=_artifact(spec)) if not spec.startswith("svd") else build_codec(spec)
    x = TEST[1].to(dtype)
    y = codec.decode(codec.encode(x), x.shape, dtype)
    assert y.shape == x.shape and y.dtype == dtype
    assert _cos(y, x) > 0.98, (spec, _cos(y, x))


def test_pca_payload_is_smaller_than_int8() -> None:
    x = TEST[0]
    assert len(_codec("pca:k=8|int8|zstd").encode(x)) < 0.5 * len(build_codec("int8").encode(x))


def test_pca_refuses_other_feature_dims() -> None:
    codec = _codec("pca:k=8|int8|zstd")
    with pytest.raises(CodecError, match="calibrated on 32-dim features"):
        codec.encode(torch.randn(4, 16))
    with pytest.raises(CodecError, match="calibrated on 32-dim features"):
        codec.decode(b"\0" * 16, (4, 16))


# ---- SVD -------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 20), dim=st.integers(1, 20), r=st.integers(1, 24), seed=st.integers(0, 1000))
def test_svd_full_rank_is_exact_and_shapes_hold(tokens: int, dim: int, r: int, seed: int) -> None:
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(seed))
    codec = build_codec(f"svd:r={r}|zstd")
    y = codec.decode(codec.encode(x), x.shape)
    assert y.shape == x.shape
    if r >= min(tokens, dim):
        assert torch.allclose(y, x, atol=1e-4)


def test_svd_needs_no_calibration() -> None:
    assert build_codec("svd:r=4|fp16|zstd").stages[0].artifact_digest() is None


# ---- k-means ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_bit_packing_is_exact(bits: int, n: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 1 << bits, n, dtype=np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.size == packed_len(n, bits)
    assert np.array_equal(unpack_bits(packed, n, bits), codes)


@pytest.mark.parametrize("granularity", ["channel", "global"])
def test_kmeans_4bit_codes_are_exact_codebook_entries(granularity: str) -> None:
    spec = f"kmeans:bits=4,granularity={granularity}|raw"
    codec = _codec(spec)
    stage = codec.stages[0]
    x = TEST[2]
    payload = codec.encode(x)
    y = codec.decode(payload, x.shape)
    rows = stage._rows(codec.stage_contexts(_ctx(x))[0])
    # Every decoded value is its channel's nearest codebook entry: 4-bit indices survive packing exactly.
    nearest = rows[torch.arange(DIM), (x.T.unsqueeze(-1) - rows.unsqueeze(1)).abs().argmin(-1).T]
    assert torch.equal(y, nearest)
    assert len(payload) < x.numel() * 4 // 8 + 64


def _ctx(x: torch.Tensor) -> Any:
    from shared.codecs import CodecContext

    return CodecContext(int(x.shape[0]), int(x.shape[1]), x.dtype)


def test_kmeans_beats_uniform_4bit_on_its_calibration_distribution() -> None:
    # Lloyd-Max is MSE-optimal for the distribution it was fitted on (held-out data from a
    # 384-row fit can fall outside it; the tiny-model numbers are in the codec notes).
    x = torch.cat(TRAIN)
    km = _codec("kmeans:bits=4|zstd")
    lin = build_codec("linear:bits=4,granularity=channel|zstd")
    err_km = float((km.decode(km.encode(x), x.shape) - x).pow(2).mean())
    err_lin = float((lin.decode(lin.encode(x), x.shape) - x).pow(2).mean())
    assert err_km < err_lin


# ---- zstd dictionary -------------------------------------------------------------------------


def test_zstd_dictionary_payloads_are_smaller_on_small_packets() -> None:
    small_train = [x[:4] for x in _features(64, seed=5)]
    art = fit_stages("int8|zstd:dict=1", small_train)
    with_dict = build_codec("int8|zstd:dict=1", artifact=art)
    plain = build_codec("int8|zstd")
    small = [x[:4] for x in _features(8, seed=7)]
    sizes_dict = [len(with_dict.encode(x)) for x in small]
    sizes_plain = [len(plain.encode(x)) for x in small]
    assert sum(sizes_dict) < sum(sizes_plain), (sizes_dict, sizes_plain)
    for x in small:
        assert torch.equal(
            with_dict.decode(with_dict.encode(x), x.shape), plain.decode(plain.encode(x), x.shape)
        )


def test_plain_zstd_keeps_its_spec_and_fingerprint() -> None:
    assert build_codec("int8|zstd:dict=0").spec == "int8|zstd:level=3"
    assert build_codec("int8|zstd:dict=0").fingerprint == build_codec("int8").fingerprint


# ---- artifacts and fingerprints --------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["pca:k=8|int8|zstd", "kmeans:bits=4|zstd", "int8|zstd:dict=1", f"{SPARSE}|int8", f"{AE}|int8"]
)
def test_calibrated_stage_without_artifact_is_a_clear_error(spec: str) -> None:
    name = spec.split(":")[0] if not spec.startswith("int8") else "zstd"
    with pytest.raises(CodecError, match=rf"{name} needs calibration: run splitvlm calibrate"):
        build_codec(spec)


def test_artifact_for_another_spec_is_refused() -> None:
    with pytest.raises(CodecError, match="fitted for codec 'pca:k=8"):
        build_codec("pca:k=4|int8|zstd", artifact=_artifact("pca:k=8|int8|zstd"))


def test_fingerprint_changes_with_the_artifact(tmp_path: Path) -> None:
    spec = "pca:k=8|int8|zstd"
    a = fit_stages(spec, TRAIN)
    b = fit_stages(spec, _features(16, seed=3))
    fa, fb = build_codec(spec, artifact=a).fingerprint, build_codec(spec, artifact=b).fingerprint
    assert fa != fb and a.fingerprint != b.fingerprint
    # Saved and loaded, the artifact (and codec) keep their fingerprints; the payloads decode alike.
    a.save(tmp_path / "a")
    loaded = CalibrationArtifact.load(tmp_path / "a.json")
    assert loaded.fingerprint == a.fingerprint
    codec = build_codec(spec, artifact=tmp_path / "a")
    assert codec.fingerprint == fa
    x = TEST[0]
    assert torch.equal(
        codec.decode(codec.encode(x), x.shape),
        build_codec(spec, artifact=a).decode(build_codec(spec, artifact=a).encode(x), x.shape),
    )


def test_edited_artifact_files_are_refused(tmp_path: Path) -> None:
    _artifact("pca:k=8|int8|zstd").save(tmp_path / "a")
    meta = json.loads((tmp_path / "a.json").read_text())
    meta["model"] = "something else"
    (tmp_path / "a.json").write_text(json.dumps(meta))
    with pytest.raises(CodecError, match="does not match its contents"):
        CalibrationArtifact.load(tmp_path / "a")


def test_artifact_fitted_on_another_model_is_refused(tmp_path: Path) -> None:
    from shared.codecs.calibrate import load_artifacts
    from shared.errors import FingerprintMismatchError

    _artifact("pca:k=8|int8|zstd").save(tmp_path / "a")  # fitted on "sha256:000..."
    assert set(load_artifacts([tmp_path / "a"], "sha256:" + "0" * 64)) == {"pca:k=8|int8|zstd:level=3"}
    with pytest.raises(FingerprintMismatchError, match="fitted on model test"):
        load_artifacts([tmp_path / "a"], "sha256:" + "1" * 64)
    with pytest.raises(CodecError, match="two calibration artifacts"):
        load_artifacts([tmp_path / "a", tmp_path / "a.json"])


def test_artifact_tensors_are_checked_against_the_parameters() -> None:
    art = _artifact("pca:k=8|int8|zstd")
    bad = CalibrationArtifact(
        spec=art.spec, tensors=dict(art.tensors) | {"0.pca.mean": torch.zeros(DIM + 1)}, stages=art.stages
    )
    with pytest.raises(CodecError, match="'mean' is float32 \\(33,\\), expected float32 \\(32,\\)"):
        build_codec(art.spec, artifact=bad)


# ---- decompression-bomb safety ---------------------------------------------------------------


def _table(name: str, code: int, shape: tuple[int, ...], count: int = 1) -> bytes:
    encoded = name.encode()
    return struct.pack(
        f"<BBB{len(encoded)}sBB{len(shape)}I", 1, count, len(encoded), encoded, code, len(shape), *shape
    )


@pytest.mark.parametrize(
    ("spec", "field", "code"),
    [
        ("pca:k=8|raw", "x", 1),
        ("svd:r=4|raw", "x", 1),
        ("kmeans:bits=4|raw", "q", 5),
        ("int8|zstd:dict=1", None, None),
        (f"{SPARSE}|raw", "x", 1),
        (f"{AE}|raw", "x", 1),
    ],
)
def test_tables_declaring_huge_shapes_are_rejected_before_allocating(
    spec: str, field: str | None, code: int | None
) -> None:
    if spec.startswith("svd"):
        codec = build_codec(spec)
    elif spec.endswith("|raw") and spec.startswith(("sparse", "ae")):
        codec = build_codec(spec, artifact=_first_stage_artifact(spec))
    else:
        codec = build_codec(spec, artifact=_artifact(spec))
    if field is None:
        import zstandard

        bomb = zstandard.ZstdCompressor().compress(b"\0" * (1 << 24))
        with pytest.raises(PacketTooLargeError):
            codec.decode(bomb, (4, DIM))
        return
    count = 2 if spec.startswith("sparse") else 1  # sparse sends x and idx
    payload = _table(field, code or 1, (1 << 30, 1 << 20) if field == "x" else (1 << 31,), count)
    with pytest.raises(PacketTooLargeError):
        codec.decode(payload, (4, DIM))


@pytest.mark.parametrize(
    "spec",
    [
        "pca:k=8|int8|zstd",
        "svd:r=4|fp16|zstd",
        "kmeans:bits=4|zstd",
        "int8|zstd:dict=1",
        f"{SPARSE}|int8|zstd",
        f"{AE}|int8|zstd",
    ],
)
def test_truncated_and_flipped_payloads_never_decode_silently(spec: str) -> None:
    codec = build_codec(spec, artifact=_artifact(spec)) if not spec.startswith("svd") else build_codec(spec)
    x = TEST[3]
    payload = codec.encode(x)
    for cut in (1, len(payload) // 2, len(payload) - 1):
        with pytest.raises(CodecError):
            codec.decode(payload[:cut], x.shape)
    with pytest.raises((CodecError, PacketTooLargeError)):
        codec.decode(payload + b"\0", x.shape)


def test_sparse_atom_indices_are_checked() -> None:
    spec = f"{SPARSE}|raw"
    codec = build_codec(spec, artifact=_first_stage_artifact(spec))
    x = TEST[0]
    payload = bytearray(codec.encode(x))
    assert _cos(codec.decode(bytes(payload), x.shape), x) > 0.98
    # The last field is idx (int16, [T, k]); point its last entry past the dictionary.
    payload[-2:] = struct.pack("<h", 16)
    with pytest.raises(CodecError, match=r"atom indices must lie in \[0, 16\)"):
        codec.decode(bytes(payload), x.shape)
    payload[-2:] = struct.pack("<h", -1)
    with pytest.raises(CodecError, match="atom indices"):
        codec.decode(bytes(payload), x.shape)


def test_sparse_and_ae_reconstruct_well() -> None:
    for spec in (f"{SPARSE}|int8|zstd", f"{AE}|int8|zstd"):
        codec = _codec(spec)
        assert min(_cos(codec.decode(codec.encode(x), x.shape), x) for x in TEST) > 0.98, spec


def test_bad_svd_values_are_rejected() -> None:
    codec = build_codec("svd:r=2|raw")
    payload = _table("x", 1, (4 + DIM, 2)) + struct.pack("<f", float("inf")) * ((4 + DIM) * 2)
    with pytest.raises(CodecError, match="NaN or Inf"):
        codec.decode(payload, (4, DIM))


# ---- splitvlm calibrate + services -----------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, model_dir: Path) -> dict[str, Path]:
    """Two artifacts for the same spec, from different scenes, made with `splitvlm calibrate`."""
    from shared.cli import app

    out = tmp_path_factory.mktemp("artifacts")
    paths = {}
    for name, seed in (("a", 0), ("b", 100)):
        result = CliRunner().invoke(
            app,
            [
                "calibrate",
                "--model",
                "builtin:tiny-llava",
                "--synthetic",
                "8",
                "--seed",
                str(seed),
                "--codec",
                "pca:k=16|int8|zstd",
                "--out",
                str(out / name),
            ],
        )
        assert result.exit_code == 0, result.output
        assert "artifact fingerprint" in result.output
        paths[name] = out / name
    return paths


def test_calibrate_cli_artifact_round_trips(calibrated: dict[str, Path], tx: Any, images: list) -> None:
    art = CalibrationArtifact.load(calibrated["a"])
    assert art.spec == "pca:k=16|int8|zstd:level=3"
    assert art.model_fingerprint == tx.engine.fingerprint
    assert art.tensors["0.pca.basis"].shape == (16, 64)
    meta = json.loads(calibrated["a"].with_suffix(".json").read_text())
    assert meta["fingerprint"] == art.fingerprint and meta["created"]["samples"] == 8
    codec = build_codec("pca:k=16|int8|zstd", artifact=calibrated["a"])
    half = tx.engine.half
    feats = half.encode(half.preprocess([images[2]])).features
    y = codec.decode(codec.encode(feats), tuple(feats.shape), feats.dtype)
    assert y.shape == feats.shape and _cos(y, feats) > 0.5


def test_calibrate_cli_needs_images_or_synthetic(tmp_path: Path) -> None:
    from shared.cli import app

    result = CliRunner().invoke(app, ["calibrate", "--codec", "pca:k=4|int8", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "exactly one of --images" in result.output


def test_rx_refuses_a_packet_made_with_another_artifact(
    calibrated: dict[str, Path], cache_dir: Path, tx: Any, images: list
) -> None:
    import uuid

    from rx_service.client import RxClient
    from rx_service.server import start_rx
    from shared.config import RxSettings
    from shared.errors import RemoteError
    from shared.protocol.packet import build_header
    from shared.split import GenerationOptions

    spec = "pca:k=16|int8|zstd"
    rx = start_rx(
        RxSettings(grpc_port=0, http_port=0, cache_dir=cache_dir, codec_artifacts=[calibrated["b"]]),
        http=False,
    )
    try:
        rx_codec = build_codec(spec, artifact=calibrated["b"])
        with RxClient(rx.grpc_address) as client:
            assert rx_codec.fingerprint in client.info().codec_fingerprints
        half = tx.engine.half
        features = half.encode(half.preprocess([images[0]]))

        def send(codec: Any) -> Any:
            payload = codec.encode(features.features)
            header = build_header(
                request_id=uuid.uuid4().hex,
                model_fingerprint=tx.engine.fingerprint,
                split_point=tx.engine.settings.split_point,
                codec_spec=codec.spec,
                codec_fingerprint=codec.fingerprint,
                features=features,
                payload=payload,
            )
            with RxClient(rx.grpc_address) as client:
                return client.generate(
                    header, payload, "What is in the image?", GenerationOptions(max_new_tokens=2)
                )

        tx_codec = build_codec(spec, artifact=calibrated["a"])
        assert tx_codec.fingerprint != rx_codec.fingerprint
        with pytest.raises(RemoteError) as info:
            send(tx_codec)
        err = info.value
        assert err.grpc_code == grpc.StatusCode.FAILED_PRECONDITION
        assert tx_codec.fingerprint in err.detail and rx_codec.fingerprint in err.detail
        # The same artifact on both sides goes through.
        send(rx_codec)
    finally:
        rx.stop()
