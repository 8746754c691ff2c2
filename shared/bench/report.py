"""Write a bench result as JSON, a Markdown report and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

JSON_NAME = "bench.json"
MARKDOWN_NAME = "README.md"
ACCURACY_PLOT = "accuracy_vs_bytes.png"
LATENCY_PLOT = "latency_vs_bandwidth.png"
RATE_PLOT = "rate_control.png"


def _clean(value: Any) -> Any:
    """JSON-safe: nan → null, ±inf → "inf"/"-inf" (strict JSON has neither)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    """bench.json, README.md and the two plots in `out` (created); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / JSON_NAME, out / MARKDOWN_NAME, out / ACCURACY_PLOT, out / LATENCY_PLOT]
    paths[0].write_text(json.dumps(_clean(results), indent=2, allow_nan=False) + "\n")
    plot_accuracy(results, paths[2])
    plot_latency(results, paths[3])
    paths[1].write_text(markdown(results))
    if results.get("rate_control"):
        paths.append(out / RATE_PLOT)
        plot_rate(results, paths[-1])
    return paths


def plot_rate(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rate_control"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    budgets = [r["target_bytes"] for r in rows]
    ax.plot(budgets, [100 * r["accuracy"] for r in rows], marker="o", label="accuracy (rate control)")
    lossless = results["findings"]["lossless_accuracy"]
    ax.axhline(100 * lossless, color="gray", linestyle="--", linewidth=0.8, label="lossless split")
    ax.set_xscale("log")
    ax.set_ylim(-3, 103)
    ax.set_xlabel("target_bytes (payload budget per image, log scale)")
    ax.set_ylabel("exact-match accuracy (%)")
    ladder = rows[0].get("ladder", "default")
    ax.set_title(f"rate control ({ladder} ladder): accuracy vs byte budget")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- plots


def plot_accuracy(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    split = results["codecs"]
    images = [r for r in results["image_baselines"] if r["name"] != "original"]
    series = (
        (split, "payload_bytes", "spec", "o", "tab:blue", "split: feature codec", 3),
        (images, "image_bytes", "name", "s", "tab:orange", "cloud-only: image codec", -9),
    )
    for rows, size_key, name_key, marker, color, label, dy in series:
        points = [(r[size_key]["mean"], 100 * r["accuracy"]) for r in rows]
        ax.scatter([x for x, _ in points], [y for _, y in points], marker=marker, color=color, label=label)
        for r, point in zip(rows, points, strict=True):
            ax.annotate(r[name_key], point, fontsize=7, xytext=(3, dy), textcoords="offset points")
    unsplit = results["findings"]["unsplit_accuracy"]
    ax.axhline(100 * unsplit, color="gray", linestyle="--", linewidth=0.8, label="unsplit, original image")
    ax.set_xscale("log")
    ax.set_ylim(-3, 103)
    ax.set_xlabel("bytes per image (mean, log scale)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(
        f"accuracy vs bytes: {results['meta']['model']} ({results['meta']['n_questions']} questions)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_latency(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = results["latency"]
    bw = lat["bandwidths_mbps"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    ax.plot(bw, lat["split"]["latency_ms"], marker="o", label=f"split ({lat['split']['name']})")
    ax.plot(bw, lat["cloud"]["latency_ms"], marker="s", label=f"cloud-only ({lat['cloud']['name']})")
    for key, color, what in (
        ("validation", "tab:blue", "split"),
        ("validation_cloud", "tab:orange", "cloud"),
    ):
        validation = results.get(key)
        if validation:
            ax.scatter(
                [validation["mbps"]],
                [validation["measured_ms"]["median"]],
                marker="x",
                s=60,
                color=color,
                zorder=5,
                label=f"{what}, measured through the throttled link",
            )
    cross = lat.get("crossover_mbps")
    if isinstance(cross, float) and math.isfinite(cross):
        ax.axvline(cross, color="gray", linestyle=":", label=f"crossover {cross:.3g} Mbit/s")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("uplink bandwidth (Mbit/s)")
    ax.set_ylabel(f"end-to-end latency (ms), RTT {lat['rtt_ms']:g} ms")
    ax.set_title("end-to-end latency vs uplink bandwidth\n(modelled from this run's compute and bytes)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- markdown


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    header = [cell.replace("|", "\\|") for cell in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def headline_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per split codec and image codec: name, bytes mean/p95, ratio, accuracy, agreement."""
    rows = []
    jpeg75 = results["meta"].get("jpeg75_bytes_mean")
    lossless = results["findings"].get("lossless_accuracy")
    for r in results["codecs"]:
        rows.append(
            [
                f"split `{r['spec']}`",
                f"{r['payload_bytes']['mean']:,.0f}",
                f"{r['payload_bytes']['p95']:,.0f}",
                f"{r['ratio_vs_fp16']:.4f}",
                _ratio(r.get("ratio_vs_jpeg75")),
                _pct(r["accuracy"]),
                _points(r.get("points_vs_lossless")),
                _pct(r["agreement_with_lossless"]),
            ]
        )
    for r in results["image_baselines"]:
        rows.append(
            [
                f"cloud `{r['name']}`",
                f"{r['image_bytes']['mean']:,.0f}",
                f"{r['image_bytes']['p95']:,.0f}",
                "-",
                _ratio(r["image_bytes"]["mean"] / jpeg75 if jpeg75 else None),
                _pct(r["accuracy"]),
                _points(100 * (r["accuracy"] - lossless) if lossless is not None else None),
                _pct(r["agreement_with_lossless_split"]),
            ]
        )
    return rows


HEADLINE_COLUMNS = [
    "path",
    "bytes/image mean",
    "p95",
    "÷ fp16 features",
    "÷ JPEG q75",
    "accuracy",
    "points vs lossless",
    "agree w/ lossless",
]


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}" if x < 0.1 else f"{x:.3f}"


def _points(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f}"


def findings_lines(results: dict[str, Any]) -> list[str]:
    f = results["findings"]
    lat = results["latency"]
    best = f["best_split"]
    lines = []
    if f["lossless_accuracy"] < 0.05:
        lines.append(
            "- **Note:** lossless accuracy is near zero: this model does not answer these questions "
            "(e.g. random weights), so the accuracy-based choices below are uninformative; agreement "
            "with the lossless answers is the meaningful fidelity column."
        )
    lines += [
        f"- Lossless split accuracy {_pct(f['lossless_accuracy'])} (unsplit on the original image: "
        f"{_pct(f['unsplit_accuracy'])}).",
        f"- Smallest split payload within 1 point of lossless accuracy: `{best['spec']}`, "
        f"{best['payload_bytes']['mean']:,.0f} B mean ({best['payload_bytes']['p95']:,.0f} B p95, "
        f"{best['ratio_vs_fp16']:.4f} of fp16 features), accuracy {_pct(best['accuracy'])}.",
    ]
    image = f["image_for_same_accuracy"]
    if image:
        lines.append(
            f"- Smallest image for the same accuracy (cloud-only): `{image['name']}`, "
            f"{image['image_bytes']['mean']:,.0f} B mean, accuracy {_pct(image['accuracy'])}: "
            f"{f['image_over_split_bytes']:.1f}x the split payload."
        )
    else:
        lines.append("- No image codec tried reaches that accuracy (cloud-only needs a larger image).")
    cross = f["crossover_mbps"]
    split_name, cloud_name = lat["split"]["name"], lat["cloud"]["name"]
    if cross is None:
        lines.append(
            f"- Split (`{split_name}`) never beats cloud-only (`{cloud_name}`) on latency: it sends at "
            "least as many bytes."
        )
    elif math.isinf(cross):
        lines.append(
            f"- Split (`{split_name}`) beats cloud-only (`{cloud_name}`) on end-to-end latency at every "
            f"bandwidth (RTT {lat['rtt_ms']:g} ms): fewer bytes and no more compute."
        )
    else:
        lines.append(
            f"- Split (`{split_name}`) beats cloud-only (`{cloud_name}`) on end-to-end latency below "
            f"**{cross:.3g} Mbit/s** uplink (RTT {lat['rtt_ms']:g} ms); above it the extra compute "
            "costs more than the bytes saved."
        )
    target = f["overhead_target"]
    preset = f["target_preset"]
    o = f["overheads"].get(preset)
    if o:
        enc, dec = o["encode_over_vision_encoder"], o["decode_over_prefill"]
        lines.append(
            f"- `{preset}` overheads: codec encode = {_pct(enc)} of the vision encoder time "
            f"(target ≤ {_pct(target)}: {'met' if o['encode_ok'] else '**MISSED**'}); codec decode = "
            f"{_pct(dec)} of the LLM prefill (target ≤ {_pct(target)}: "
            f"{'met' if o['decode_ok'] else '**MISSED**'})."
        )
    else:
        lines.append(f"- `{preset}` was not benchmarked (or was refused by this split): no overhead check.")
    for v in (results.get("validation"), results.get("validation_cloud")):
        if not v:
            continue
        lines.append(
            f"- Throttled loopback link at {v['mbps']:g} Mbit/s, RTT {v['rtt_ms']:g} ms (`{v['spec']}`, "
            f"{v['requests']} requests): measured {v['measured_ms']['median']:.1f} ms median vs modelled "
            f"{v['modelled_ms']['median']:.1f} ms (difference {v['difference_ms']['median']:+.1f} ms, "
            f"{v['difference_pct']:+.1f}%); what the link added (throttled minus the same request "
            f"unthrottled, each less its own compute) {v['link_measured_ms']['median']:.1f} ms vs "
            f"{v['link_model_ms']['median']:.1f} ms "
            f"modelled (RTT + bytes / rate); the bench's prediction from its in-process medians: "
            f"{v['predicted_ms_from_bench']:.1f} ms."
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    parts = [
        "# splitvlm bench\n",
        f"Model `{meta['model']}` (split {meta['split']}), {meta['items']}, {meta['n_questions']} questions, "
        f"input {meta['input_size']}, greedy answers of at most {meta['max_new_tokens']} tokens, "
        f"{meta['torch_threads']} torch thread(s), {meta['processor']} / {meta['platform']}, "
        f"torch {meta['torch']}, {meta['date_utc']}. Everything below was measured in this run "
        f"({results['seconds']:.0f} s).\n",
        "## Findings\n",
        "\n".join(findings_lines(results)) + "\n",
        "## Bytes and accuracy\n",
        _table(HEADLINE_COLUMNS, headline_rows(results)),
        "\nSplit bytes: the codec payload (the packet adds a ~100 B header). Cloud bytes: the encoded "
        "image at the model's input resolution; `original` is that image uncompressed (RGB, "
        "width × height × 3 B), run through the unsplit model. ÷ JPEG q75: mean bytes over the mean "
        "JPEG q75 bytes of the same input images at the model's input size "
        f"({results['meta'].get('jpeg75_bytes_mean') or 0:,.0f} B). Points vs lossless: accuracy "
        "minus the lossless split's, in percentage points. Agreement: the fraction of answers "
        "identical to the lossless split's (which are the unsplit model's on the same image).\n",
        f"\n![accuracy vs bytes]({ACCURACY_PLOT})\n",
    ]
    if results["skipped_codecs"]:
        parts.append(
            "\nSkipped: " + "; ".join(f"`{k}`: {v}" for k, v in results["skipped_codecs"].items()) + "\n"
        )

    if results.get("rate_control"):
        rows = []
        for r in results["rate_control"]:
            b = r["payload_bytes"]
            rows.append(
                [
                    f"{r['target_bytes']:,}",
                    _pct(r["accuracy"]),
                    f"{b['mean']:,.0f}" if b else "-",
                    f"{b['max']:,.0f}" if b else "-",
                    str(r["images_without_a_fitting_codec"]),
                    ", ".join(f"`{k}` ×{v}" for k, v in r["chosen"].items()),
                ]
            )
        parts += [
            "## Rate control: accuracy vs byte budget\n",
            f"`target_bytes=N`, a codec chosen per image from the {results['rate_control'][0].get('ladder')} "
            "ladder (measured: the most accurate codec, on validation scenes, whose payload fits). "
            "Images no codec fits count as wrong.\n\n",
            _table(["target B", "accuracy", "payload mean", "max", "no codec fits", "chosen"], rows),
            f"\n![rate control]({RATE_PLOT})\n",
        ]

    stages = results["stages_ms"]
    parts += [
        "## Per-stage timings (ms, median / p95)\n",
        "Tx, per image: preprocess "
        f"{_ms(stages['preprocess']['median'])} / {_ms(stages['preprocess']['p95'])}, vision encoder "
        f"{_ms(stages['vision_encoder']['median'])} / {_ms(stages['vision_encoder']['p95'])}.\n\n",
    ]
    cols = ["codec_encode", "serialize", "codec_decode", "connector", "prefill", "per_token_decode"]
    rows = []
    for r in results["codecs"]:
        t = r["timings_ms"]
        cells = [f"`{r['spec']}`" + (" (folded)" if r["folded_decode"] else "")]
        cells += [f"{_ms(t[c]['median'])} / {_ms(t[c]['p95'])}" if c in t else "-" for c in cols]
        rows.append(cells)
    parts.append(_table(["codec", *cols], rows))
    if any(r["folded_decode"] for r in results["codecs"]):
        parts.append(
            "\n(folded): the Rx decodes straight into the projector's first Linear (`shared.codecs.fold`), "
            "so codec_decode includes that Linear.\n"
        )
    rows = []
    for r in results["image_baselines"]:
        t = r["timings_ms"]
        rows.append(
            [f"`{r['name']}`"]
            + [
                f"{_ms(t[c]['median'])} / {_ms(t[c]['p95'])}"
                for c in ("image_encode", "image_decode", "server_model")
            ]
        )
    parts.append(
        "\nCloud-only:\n\n"
        + _table(["image", "image_encode", "image_decode", "server (processor + generate)"], rows)
    )

    parts.append("## Overheads and codec throughput\n")
    rows = []
    for r in results["codecs"]:
        o, tp = r["overhead"], r["throughput_mb_s_per_core"]
        rows.append(
            [
                f"`{r['spec']}`",
                _pct(o["encode_over_vision_encoder"]),
                _pct(o["decode_over_prefill"]),
                f"{tp['encode']:.1f}",
                f"{tp['decode']:.1f}",
            ]
        )
    parts.append(
        _table(
            ["codec", "encode ÷ vision encoder", "decode ÷ prefill", "encode MB/s/core", "decode MB/s/core"],
            rows,
        )
    )
    parts.append(
        f"\nTargets: encode ≤ {_pct(results['findings']['overhead_target'])} of the vision encoder, decode ≤ "
        f"{_pct(results['findings']['overhead_target'])} of prefill. MB/s of raw features "
        f"({results['codecs'][0]['raw_feature_bytes']:,} B per image) per torch thread.\n"
    )

    lat = results["latency"]
    parts.append("## End-to-end latency vs uplink bandwidth (ms)\n")
    parts.append(
        f"Modelled: Tx compute + RTT ({lat['rtt_ms']:g} ms) + uplink bytes × 8 / rate + Rx compute, from "
        "this run's medians. Tx and Rx compute ran on the same host.\n\n"
    )
    names = list(lat["all_split"])
    rows = []
    for i, b in enumerate(lat["bandwidths_mbps"]):
        rows.append(
            [f"{b:g}", _ms(lat["cloud"]["latency_ms"][i])] + [_ms(lat["all_split"][n][i]) for n in names]
        )
    parts.append(
        _table(["Mbit/s", f"cloud `{lat['cloud']['name']}`", *[f"split `{n}`" for n in names]], rows)
    )
    parts.append(
        f"\nCompute per request: split `{lat['split']['name']}` Tx {lat['split']['tx_ms']:.1f} ms + Rx "
        f"{lat['split']['rx_ms']:.1f} ms, {lat['split']['uplink_bytes']:,.0f} B up; cloud "
        f"`{lat['cloud']['name']}` Tx {lat['cloud']['tx_ms']:.1f} ms + Rx {lat['cloud']['rx_ms']:.1f} ms, "
        f"{lat['cloud']['uplink_bytes']:,.0f} B up.\n"
    )
    parts.append(f"\n![latency vs bandwidth]({LATENCY_PLOT})\n")

    v = results.get("validation")
    c = results.get("validation_cloud")
    if v:
        parts.append("## Throttled-link validation\n")
        parts.append(
            "Split: Rx and Tx services on loopback, the Tx → Rx gRPC connection through a Python "
            "TCP proxy that "
            f"serialises the uplink at {v['mbps']:g} Mbit/s (1460-byte segments, no burst) and delays each "
            f"direction by RTT/2 = {v['rtt_ms'] / 2:g} ms. "
            "Measured: the client's wall time per `TxClient.ask`. Modelled: the stage timings "
            "the services report for that request + RTT + the bytes that "
            "crossed the proxy uplink × 8 / rate. Cloud-only: the encoded image and the question over "
            "one persistent TCP connection through the same kind of proxy to a loopback server that "
            "decodes the image and runs the whole model; modelled: image encode + the server's own "
            "time + RTT + bytes × 8 / rate.\n\n"
        )
        rows = [
            [k, _ms(v[k]["median"]), _ms(v[k]["p95"])]
            + ([_ms(c[k]["median"]), _ms(c[k]["p95"])] if c else [])
            for k in (
                "measured_ms",
                "modelled_ms",
                "difference_ms",
                "unthrottled_ms",
                "link_measured_ms",
                "link_model_ms",
                "link_difference_ms",
            )
        ]
        rows.append(
            ["uplink bytes (through the proxy)"]
            + [f"{x['uplink_bytes'][q]:,.0f}" for x in (v, c) if x for q in ("median", "p95")]
        )
        header = ["", f"split `{v['spec']}` median", "p95"]
        if c:
            header += [f"cloud `{c['spec']}` median", "p95"]
        parts.append(_table(header, rows))
        parts.append(
            "\nEach request also ran on the same link unthrottled (no rate limit, no delay) just before; "
            "link_measured = (throttled − its compute) − (unthrottled − its compute) isolates what the "
            "link adds, to compare with "
            "link_model = RTT + uplink bytes × 8 / rate. The rest of difference_ms is what the compute "
            "terms leave out: the client → Tx loopback call (image upload and decode), gRPC/HTTP/2 "
            "framing and thread hand-offs.\n"
        )
    return "\n".join(parts)
