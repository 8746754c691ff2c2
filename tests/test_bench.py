"""`splitvlm bench`: the --quick run end to end on the default model, and its building blocks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shared.bench.baselines import ImageCodec, at_input_resolution, input_size, parse_image_codec
from shared.bench.latency import PathCost, crossover_mbps, transfer_ms
from shared.bench.timings import percentile, summary

SPLIT_STAGES = ("codec_encode", "serialize", "codec_decode", "connector", "prefill", "per_token_decode")


@pytest.fixture(scope="module")
def quick_run(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    from shared.cli import app

    out = tmp_path_factory.mktemp("bench")
    result = CliRunner().invoke(
        app,
        [
            *("bench", "--quick", "--model", "builtin:reference-llava", "--out", str(out)),
            *("--bandwidths", "0.5,2,10,100", "--rtt-ms", "40", "--target-bytes", "50,500"),
        ],
    )
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "bench.json").read_text()), result.output


def test_quick_writes_all_files(quick_run: tuple[Path, dict, str]) -> None:
    out, _, output = quick_run
    for name in ("bench.json", "README.md", "accuracy_vs_bytes.png", "latency_vs_bandwidth.png"):
        assert (out / name).stat().st_size > 0, name
    for png in ("accuracy_vs_bytes.png", "latency_vs_bandwidth.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "README.md").read_text()
    for heading in (
        "## Findings",
        "## Bytes and accuracy",
        "## Per-stage timings",
        "## Overheads",
        "## End-to-end latency",
        "## Throttled-link validation",
    ):
        assert heading in md
    for spec in ("lossless", "fp16", "int8", "balanced", "tiny", "jpeg:75", "webp:80", "png"):
        assert f"`{spec}`" in md
    assert "balanced" in output and "Mbit/s" in output


def test_quick_codec_rows(quick_run: tuple[Path, dict, str]) -> None:
    _, res, _ = quick_run
    meta = res["meta"]
    assert meta["n_images"] == 3 and meta["n_questions"] == 6
    stages = res["stages_ms"]
    assert stages["preprocess"]["median"] > 0 and stages["vision_encoder"]["median"] > 0
    rows = {r["spec"]: r for r in res["codecs"]}
    assert {"lossless", "fp16", "int8", "balanced", "tiny"} <= rows.keys()
    assert rows["lossless"]["agreement_with_lossless"] == 1.0
    for spec, r in rows.items():
        b = r["payload_bytes"]
        assert 0 < b["mean"] <= b["max"] and b["p95"] <= b["max"], spec
        assert r["ratio_vs_fp16"] == pytest.approx(b["mean"] / r["fp16_feature_bytes"])
        assert r["fp16_feature_bytes"] * 2 == r["raw_feature_bytes"]  # the features are fp32
        assert r["wire_bytes"]["mean"] > b["mean"]  # header + prompt on top of the payload
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["agreement_with_lossless"] <= 1.0
        t = r["timings_ms"]
        for stage in SPLIT_STAGES:
            if stage == "per_token_decode" and stage not in t:
                continue  # one-word answers: a single decode step, no gap between tokens
            assert t[stage]["median"] > 0 and t[stage]["p95"] >= t[stage]["median"], (spec, stage)
        o = r["overhead"]
        assert o["encode_over_vision_encoder"] == pytest.approx(
            t["codec_encode"]["median"] / stages["vision_encoder"]["median"]
        )
        assert o["decode_over_prefill"] == pytest.approx(t["codec_decode"]["median"] / t["prefill"]["median"])
        assert r["throughput_mb_s_per_core"]["encode"] > 0 and r["throughput_mb_s_per_core"]["decode"] > 0
    # Payload ordering the codecs are built for.
    assert rows["fp16"]["payload_bytes"]["mean"] < rows["lossless"]["payload_bytes"]["mean"]
    assert rows["int8"]["payload_bytes"]["mean"] < rows["fp16"]["payload_bytes"]["mean"]
    assert rows["tiny"]["payload_bytes"]["mean"] < rows["balanced"]["payload_bytes"]["mean"]
    assert rows["balanced"]["ratio_vs_fp16"] < 1 / 8


def test_quick_rate_control_curve(quick_run: tuple[Path, dict, str]) -> None:
    out, res, _ = quick_run
    rows = {r["target_bytes"]: r for r in res["rate_control"]}
    assert set(rows) == {50, 500}
    assert rows[500]["ladder"] == "measured"  # the reference model ships its measured ladder
    assert rows[500]["payload_bytes"]["max"] <= 500 and rows[500]["images_without_a_fitting_codec"] == 0
    assert sum(rows[500]["chosen"].values()) == 3
    assert rows[50]["images_without_a_fitting_codec"] == 3 and rows[50]["accuracy"] == 0.0  # nothing fits
    assert (out / "rate_control.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Rate control" in (out / "README.md").read_text()
    for r in res["codecs"]:
        assert r["ratio_vs_jpeg75"] == pytest.approx(
            r["payload_bytes"]["mean"] / res["meta"]["jpeg75_bytes_mean"]
        )


def test_quick_image_baselines(quick_run: tuple[Path, dict, str]) -> None:
    _, res, _ = quick_run
    rows = {r["name"]: r for r in res["image_baselines"]}
    assert {"original", "jpeg:10", "jpeg:90", "webp:50", "webp:80", "png"} <= rows.keys()
    for name, r in rows.items():
        assert r["image_bytes"]["mean"] > 0, name
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["timings_ms"]["server_model"]["median"] > 0
    assert rows["jpeg:10"]["image_bytes"]["mean"] < rows["jpeg:90"]["image_bytes"]["mean"]
    # PNG is lossless: the decoded image is the original, so are the answers; and the lossless
    # split gives the unsplit model's answers.
    assert rows["png"]["agreement_with_unsplit"] == 1.0
    assert rows["original"]["agreement_with_lossless_split"] == 1.0


def test_quick_latency_and_validation(quick_run: tuple[Path, dict, str]) -> None:
    _, res, _ = quick_run
    lat = res["latency"]
    assert lat["bandwidths_mbps"] == [0.5, 2.0, 10.0, 100.0] and lat["rtt_ms"] == 40.0
    for side in ("split", "cloud"):
        curve = lat[side]["latency_ms"]
        assert len(curve) == 4 and all(x > 40.0 for x in curve)
        assert curve == sorted(curve, reverse=True)  # faster link, lower latency
        cost = PathCost(lat[side]["name"], lat[side]["tx_ms"], lat[side]["rx_ms"], lat[side]["uplink_bytes"])
        assert curve == pytest.approx(cost.curve(lat["bandwidths_mbps"], 40.0))
    findings = res["findings"]
    assert findings["best_split"]["spec"] == lat["split"]["name"]
    assert findings["best_split"]["accuracy"] >= findings["lossless_accuracy"] - 0.01
    assert "balanced" in findings["overheads"]
    v = res["validation"]
    assert v["requests"] == 3 and v["mbps"] == 0.5 and v["spec"] == lat["split"]["name"]
    assert v["measured_ms"]["median"] > 40.0 and v["modelled_ms"]["median"] > 40.0
    assert all(row["uplink_bytes"] > row["payload_bytes"] > 0 for row in v["rows"])
    for row in v["rows"]:
        assert row["modelled_ms"] == pytest.approx(row["compute_ms"] + row["link_model_ms"])
        assert row["link_model_ms"] == pytest.approx(40.0 + transfer_ms(row["uplink_bytes"], 0.5))
    assert math.isfinite(v["difference_pct"])
    c = res["validation_cloud"]
    assert c["requests"] == 3 and c["spec"] == lat["cloud"]["name"]
    assert c["measured_ms"]["median"] > 40.0
    assert all(row["uplink_bytes"] > row["payload_bytes"] > 0 for row in c["rows"])
    for row in c["rows"]:
        assert row["modelled_ms"] == pytest.approx(row["compute_ms"] + row["link_model_ms"])


def test_bench_on_an_image_folder(model_dir: Path, tmp_path: Path) -> None:
    from shared.bench import BenchConfig, run_bench
    from shared.reference.scenes import write_image_folder

    write_image_folder(tmp_path / "imgs", [10_000_000, 10_000_001])
    config = BenchConfig(
        codecs=["int8"],
        image_codecs=[ImageCodec("JPEG", 50)],
        questions=tmp_path / "imgs" / "questions.jsonl",
        validate=False,
    )
    res = run_bench(config)
    assert res["meta"]["n_images"] == 2 and res["validation"] is None
    assert [r["spec"] for r in res["codecs"]] == ["lossless", "int8"]  # the reference always runs
    assert [r["name"] for r in res["image_baselines"]] == ["original", "jpeg:50"]


def test_helpers() -> None:
    from shared.cli import _split_codec_list

    assert _split_codec_list("lossless, pool:2|int8|zstd,linear:bits=4,granularity=channel|zstd,tiny") == [
        "lossless",
        "pool:2|int8|zstd",
        "linear:bits=4,granularity=channel|zstd",
        "tiny",
    ]
    assert parse_image_codec("jpeg:75") == ImageCodec("JPEG", 75)
    assert parse_image_codec("PNG") == ImageCodec("PNG")
    with pytest.raises(ValueError):
        parse_image_codec("gif")
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and summary([2.0])["p95"] == 2.0
    assert math.isnan(summary([])["median"])
    assert transfer_ms(125_000, 1.0) == pytest.approx(1000.0)
    split = PathCost("split", tx_ms=30, rx_ms=20, uplink_bytes=500)
    cloud = PathCost("cloud", tx_ms=1, rx_ms=40, uplink_bytes=10_500)
    cross = crossover_mbps(split, cloud)  # 80 ms·Mbit/s saved on the wire vs 9 ms more compute
    assert cross == pytest.approx(80 / 9)
    assert split.latency_ms(cross, 40) == pytest.approx(cloud.latency_ms(cross, 40))
    assert crossover_mbps(PathCost("s", 1, 1, 10), cloud) == math.inf
    assert crossover_mbps(PathCost("s", 1, 1, 20_000), cloud) is None
    from PIL import Image

    assert at_input_resolution(Image.new("RGB", (100, 50)), (64, 64)).size == (64, 64)
    wide = Image.new("RGB", (100, 50), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 20, 50))  # a red left strip: cropped away by a center crop
    cropped = at_input_resolution(wide, (32, 32), crop=True)
    assert cropped.size == (32, 32) and cropped.getpixel((0, 16)) == (0, 0, 255)
    assert input_size({"height": 1}) is None

    from types import SimpleNamespace

    qwen = SimpleNamespace(size={"shortest_edge": 3136, "longest_edge": 12845056})  # a pixel budget
    clip = SimpleNamespace(size={"shortest_edge": 336}, do_center_crop=True)
    assert input_size(qwen) is None and input_size(clip) == (336, 336)
    data = ImageCodec("WEBP", 80).encode(Image.new("RGB", (32, 32), (200, 10, 10)))
    assert ImageCodec.decode(data).size == (32, 32)
