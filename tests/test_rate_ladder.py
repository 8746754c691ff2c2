"""Measured ladders (`shared.codecs.ladder`) and rate control ordered by accuracy, on the tiny LLaVA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from shared.codecs import build_codec
from shared.codecs.calibrate import fit_stages
from shared.codecs.ladder import FORMAT, MeasuredLadder, Rung, artifact_digests, measure_ladder
from shared.codecs.rate import DEFAULT_LADDER, RateController, RateTarget, mean_token_cosine
from shared.errors import CodecError, FingerprintMismatchError
from shared.reference.scenes import make_scene
from shared.split import CodecSupport, SplitPoint, check_codec_support, load_tx_half

FINGERPRINT = "sha256:" + "ab" * 32
# Accuracies shaped like the trained reference model's: token pooling and pruning collapse,
# low-bit full-token codes keep most of it (numbers invented for the test, sizes measured).
ACCURACY = {
    "raw|zstd": 0.95,
    "fp16|zstd": 0.95,
    "int8|zstd": 0.945,
    "linear:bits=6|zstd": 0.94,
    "linear:bits=4|zstd": 0.93,
    "linear:bits=3|zstd": 0.91,
    "prune:0.5|linear:bits=4|zstd": 0.265,
    "linear:bits=2|zstd": 0.89,
    "pool:2|linear:bits=4|zstd": 0.62,
    "pool:2|linear:bits=3|zstd": 0.61,
    "pool:2|linear:bits=2|zstd": 0.55,
    "pool:4|linear:bits=4|zstd": 0.26,
    "pool:4|linear:bits=3|zstd": 0.255,
    "pool:4|linear:bits=2|zstd": 0.25,
}


@pytest.fixture(scope="module")
def scene_features(model_dir: Path) -> list[torch.Tensor]:
    """The tiny LLaVA's vision-tower features ([64, 64] float32) of 8 synthetic scenes."""
    half = load_tx_half(model_dir, SplitPoint.AFTER_VISION_TOWER)
    with torch.inference_mode():
        return [half.encode(half.preprocess([make_scene(s).image])).features.clone() for s in range(8)]


def _rung(spec: str, features: list[torch.Tensor], accuracy: float, artifact: Any = None) -> Rung:
    codec = build_codec(spec, artifact=artifact)
    sizes = [len(codec.encode(f)) for f in features]
    return Rung(
        spec=codec.spec,
        accuracy=accuracy,
        mean_bytes=sum(sizes) / len(sizes),
        max_bytes=max(sizes),
        questions=200,
        artifact=artifact_digests(codec),
    )


@pytest.fixture(scope="module")
def ladder(scene_features: list[torch.Tensor]) -> MeasuredLadder:
    rungs = [_rung(spec, scene_features, acc) for spec, acc in ACCURACY.items()]
    return MeasuredLadder(rungs, model="test", model_fingerprint=FINGERPRINT, split="after_vision_tower")


def _no_token_reduction(codec: Any) -> None:
    check_codec_support(codec, CodecSupport(reason="test split"), "TestSplit")


def test_candidates_are_ordered_by_accuracy(ladder: MeasuredLadder) -> None:
    rate = RateController(measured=ladder)
    accuracies = [ACCURACY[spec] for spec in _short(rate.specs)]
    assert accuracies == sorted(accuracies, reverse=True)
    # Equal accuracy: the larger measured payload (higher fidelity) first.
    assert rate.specs.index(build_codec("raw|zstd").spec) < rate.specs.index(build_codec("fp16|zstd").spec)


def _short(specs: list[str]) -> list[str]:
    by_canonical = {build_codec(s).spec: s for s in ACCURACY}
    return [by_canonical[s] for s in specs]


@pytest.mark.parametrize("budget", [20000, 3000, 2000, 1200, 1000, 700, 400, 150])
def test_the_most_accurate_candidate_that_fits(
    ladder: MeasuredLadder, scene_features: list[torch.Tensor], budget: int
) -> None:
    rate = RateController(measured=ladder)
    for feats in scene_features:
        choice = rate.choose(feats, RateTarget(budget))
        assert len(choice.payload) <= budget
        assert choice.accuracy == ACCURACY[_short([choice.spec])[0]]
        # Every more accurate candidate was encoded for this image and did not fit.
        index = rate.specs.index(choice.spec)
        tried = dict(choice.tried)
        assert list(tried) == rate.specs[: index + 1]
        assert all(tried[spec] > budget for spec in rate.specs[:index])
        decoded = choice.codec.decode(choice.payload, choice.shape)
        assert tuple(decoded.shape) == choice.shape
        assert "held-out accuracy" in choice.note()


def test_a_measured_ladder_prefers_low_bit_codes_over_dropping_tokens(
    ladder: MeasuredLadder, scene_features: list[torch.Tensor]
) -> None:
    """The issue's case: the size-ordered ladder spends a budget on a token-dropping codec although
    a full-token one that the model answers far better from fits too."""
    feats = scene_features[0]
    size = {s: len(build_codec(s).encode(feats)) for s in ACCURACY}
    budget = max(size["prune:0.5|linear:bits=4|zstd"], size["linear:bits=2|zstd"])
    assert size["linear:bits=3|zstd"] > budget  # the premise, on these features
    by_size = RateController().choose(feats, RateTarget(budget))
    by_accuracy = RateController(measured=ladder).choose(feats, RateTarget(budget))
    assert by_size.codec.token_reducers  # prune:0.5 (26.5 % on the reference model)
    assert by_accuracy.spec == build_codec("linear:bits=2|zstd").spec


def test_no_fit_is_a_clear_error(ladder: MeasuredLadder, scene_features: list[torch.Tensor]) -> None:
    feats = scene_features[0]
    smallest = min(len(build_codec(s).encode(feats)) for s in ACCURACY)
    with pytest.raises(CodecError, match=rf"no codec fits target_bytes=20; .* is {smallest} B"):
        RateController(measured=ladder).choose(feats, RateTarget(20))


def test_fidelity_mode_scans_by_measured_size(
    ladder: MeasuredLadder, scene_features: list[torch.Tensor]
) -> None:
    rate = RateController(measured=ladder)
    feats = scene_features[1]
    choice = rate.choose(feats, RateTarget(min_fidelity=0.99))
    assert not choice.codec.token_reducers and choice.fidelity is not None and choice.fidelity >= 0.99
    means = {r.spec: r.mean_bytes for r in ladder.rungs}
    order = [spec for spec, _ in choice.tried]
    assert [means[s] for s in order] == sorted(means[s] for s in order)
    for spec in order[:-1]:  # the smaller candidates it passed did not keep the cosine
        codec = build_codec(spec)
        assert mean_token_cosine(feats, codec.decode(codec.encode(feats), feats.shape)) < 0.99


def test_split_support_and_missing_artifacts_leave_rungs_out(scene_features: list[torch.Tensor]) -> None:
    spec = "salient:k=16|pca:k=16|linear:bits=4|zstd"
    artifact = fit_stages(spec, scene_features[:6])
    rungs = [
        _rung(spec, scene_features, 0.938, artifact),
        _rung("pool:2|linear:bits=3|zstd", scene_features, 0.61),
        _rung("linear:bits=2|zstd", scene_features, 0.89),
    ]
    ladder = MeasuredLadder(rungs, model_fingerprint=FINGERPRINT)
    canonical = build_codec(spec, artifact=artifact).spec
    rate = RateController(measured=ladder, artifacts={canonical: artifact}, accept=_no_token_reduction)
    assert rate.specs == [canonical, build_codec("linear:bits=2|zstd").spec]
    assert len(rate.skipped) == 1 and "token reduction" in rate.skipped[0]
    budget = len(build_codec(spec, artifact=artifact).encode(scene_features[7])) + 1
    choice = rate.choose(scene_features[7], RateTarget(budget))
    assert choice.spec == canonical and choice.shape == (64, 64)  # salient keeps every position
    # Without the artifact, or with another one, the calibrated rung is left out (and says why).
    without = RateController(measured=ladder)
    assert canonical not in without.specs and any("needs calibration" in s for s in without.skipped)
    other = fit_stages(spec, scene_features[2:])
    refit = RateController(measured=ladder, artifacts={canonical: other})
    assert canonical not in refit.specs and any(
        "measured with calibration artifact" in s for s in refit.skipped
    )
    with pytest.raises(CodecError, match="no rung of the measured ladder is usable"):
        RateController(measured=MeasuredLadder(rungs[:1]))
    with pytest.raises(CodecError, match="not both"):
        RateController([build_codec("int8")], measured=ladder)


def test_without_a_measured_ladder_nothing_changes(scene_features: list[torch.Tensor]) -> None:
    rate = RateController()
    assert rate.rungs is None and rate.specs == [build_codec(s).spec for s in DEFAULT_LADDER]
    choice = rate.choose(scene_features[0], RateTarget(2000))
    assert choice.accuracy is None and "held-out accuracy" not in choice.note()


# ---- the file --------------------------------------------------------------------------------------


def test_ladder_file_round_trip_and_model_key(ladder: MeasuredLadder, tmp_path: Path) -> None:
    path = ladder.save(tmp_path / "ladder.json")
    loaded = MeasuredLadder.load(path, FINGERPRINT)
    assert loaded.ordered() == ladder.ordered() and loaded.model_fingerprint == FINGERPRINT
    assert json.loads(path.read_text())["format"] == FORMAT
    with pytest.raises(FingerprintMismatchError, match="measured on model test"):
        MeasuredLadder.load(path, "sha256:" + "cd" * 32)


def _edit(path: Path, change: Any) -> Path:
    raw = json.loads(path.read_text())
    change(raw)
    out = path.with_name("edited.json")
    out.write_text(json.dumps(raw))
    return out


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda r: r.update(format="other/1"), "format is not"),
        (lambda r: r["rungs"][0].update(accuracy=1.5), r"'accuracy' must be a number in \[0, 1\]"),
        (lambda r: r["rungs"][0].update(accuracy=True), "'accuracy' must be a number"),
        (lambda r: r["rungs"][0].update(mean_bytes=-1), "'mean_bytes' must be a non-negative number"),
        (lambda r: r["rungs"][0].update(max_bytes=1.5), "'max_bytes' must be a non-negative int"),
        (lambda r: r["rungs"][0].update(spec="nonsense:1"), "unknown codec stage 'nonsense'"),
        (lambda r: r["rungs"][0].update(extra=1), r"\(only\) the keys"),
        (lambda r: r["rungs"].append(r["rungs"][0]), "lists codec\\(s\\) twice"),
        (lambda r: r.update(rungs=[]), "at least one rung"),
        (lambda r: r.update(rungs={"a": 1}), "must be a list"),
    ],
)
def test_bad_ladder_files_are_refused(
    ladder: MeasuredLadder, tmp_path: Path, change: Any, match: str
) -> None:
    path = _edit(ladder.save(tmp_path / "ladder.json"), change)
    with pytest.raises(CodecError, match=match):
        MeasuredLadder.load(path)


def test_unreadable_ladder_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CodecError, match="does not exist"):
        MeasuredLadder.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CodecError, match="not valid JSON"):
        MeasuredLadder.load(tmp_path / "bad.json")
    (tmp_path / "big.json").write_bytes(b" " * ((1 << 20) + 1))
    with pytest.raises(CodecError, match="larger than"):
        MeasuredLadder.load(tmp_path / "big.json")


# ---- measuring ---------------------------------------------------------------------------------------


def test_measure_ladder_on_the_tiny_model(model_dir: Path) -> None:
    from shared.reference.evaluate import validation_items

    skipped: list[tuple[str, str]] = []
    measured = measure_ladder(
        model_dir,
        ["linear:bits=2|zstd", "int8", "int8|zstd:level=3", "pca:k=8|int8|zstd"],
        images=2,
        model_fingerprint=FINGERPRINT,
        on_skip=lambda spec, why: skipped.append((spec, why)),
    )
    # "int8" and "int8|zstd:level=3" are one codec: measured once. pca has no artifact: skipped.
    assert [r.spec for r in measured.rungs] == [
        build_codec("linear:bits=2|zstd").spec,
        build_codec("int8").spec,
    ]
    assert [s for s, _ in skipped] == ["pca:k=8|int8|zstd"] and "needs" in skipped[0][1]
    half = load_tx_half(model_dir, SplitPoint.AFTER_VISION_TOWER)
    images = [scene.image for scene, _ in validation_items(2)[::2]]  # never the held-out scenes
    with torch.inference_mode():
        feats = [half.encode(half.preprocess([im])).features for im in images]
    for rung in measured.rungs:
        sizes = [len(build_codec(rung.spec).encode(f)) for f in feats]
        assert rung.mean_bytes == sum(sizes) / 2 and rung.max_bytes == max(sizes)
        assert rung.questions == 4 and 0.0 <= rung.accuracy <= 1.0 and rung.artifact == ""
    assert measured.heldout_images == 2 and measured.split == "after_vision_tower"


def test_calibrate_ladder_and_eval_cli(tmp_path: Path, cache_dir: Path) -> None:
    from shared.cli import app

    out = tmp_path / "ladder.json"
    runner = CliRunner()
    args = ["--model", "builtin:tiny-llava", "--no-default-ladder", "--images", "1", "--out", str(out)]
    result = runner.invoke(
        app, ["calibrate-ladder", *args, "--codec", "linear:bits=2|zstd", "--codec", "int8|zstd"]
    )
    assert result.exit_code == 0, result.output
    ladder = MeasuredLadder.load(out)
    assert {r.spec for r in ladder.rungs} == {
        build_codec("linear:bits=2|zstd").spec,
        build_codec("int8").spec,
    }
    budget = int(max(r.max_bytes for r in ladder.rungs)) + 100
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            "builtin:tiny-llava",
            "--images",
            "1",
            "--no-unsplit",
            "--target-bytes",
            str(budget),
            "--ladder",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "measured ladder" in result.output
    bad = tmp_path / "other.json"
    bad.write_text(out.read_text().replace(ladder.model_fingerprint, "sha256:" + "0" * 64))
    result = runner.invoke(
        app, ["eval", "--model", "builtin:tiny-llava", "--images", "1", "--ladder", str(bad)]
    )
    assert result.exit_code == 2 and "calibrate-ladder" in result.output
