"""`splitvlm train-reference`: train, evaluate on the held-out set, save with a model card."""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from rich.console import Console
from rich.progress import Progress

from shared.models.card import NOTICE_FILE
from shared.reference.evaluate import EvalResult, evaluate_unsplit, heldout_items
from shared.reference.model import (
    IMAGE_SIZE,
    PATCH_SIZE,
    REFERENCE_NAME,
    TEXT_HIDDEN,
    TEXT_LAYERS,
    TOKENS_PER_IMAGE,
    VISION_HIDDEN,
    VISION_LAYERS,
    save_reference_model,
)
from shared.reference.train import TrainConfig, config_dict, train

NOTICE = (
    "splitvlm reference model: a small LLaVA trained from scratch on synthetic scenes of coloured "
    "shapes; it answers questions about those scenes only (see its model card)."
)


WEIGHTS_FILE = "model.safetensors"


def train_reference(out: Path, cfg: TrainConfig, console: Console, eval_images: int = 300) -> EvalResult:
    """Train, save into `out`, evaluate unsplit on the held-out set, write the model card."""
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    started = time.perf_counter()
    model, processor = train(cfg, log_path=log_path)
    train_seconds = time.perf_counter() - started
    meta: dict[str, Any] = {
        "notice": NOTICE,
        "train": config_dict(cfg),
        "train_seconds": round(train_seconds, 1),
        "step_seconds": step_seconds(log_path),
        "torch_threads": torch.get_num_threads(),
    }
    save_reference_model(model, processor, out, card="(evaluating)", meta=meta)
    with Progress(console=console) as progress:
        result = evaluate_unsplit(out, heldout_items(eval_images), progress)
    meta["heldout"] = {k: v for k, v in result.to_dict().items() if k != "answers"}
    meta["weights_sha256"] = sha256_file(out / WEIGHTS_FILE)
    (out / NOTICE_FILE).write_text(json.dumps({"name": REFERENCE_NAME, **meta}, indent=2) + "\n")
    (out / "README.md").write_text(model_card(out))
    return result


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def step_seconds(log_path: Path) -> dict[str, float]:
    """Mean seconds per step of each stage, from the last row the training log wrote for it."""
    last: dict[str, dict[str, Any]] = {}
    for line in log_path.read_text().splitlines():
        row = json.loads(line)
        last[row["stage"]] = row
    return {stage: round(row["elapsed_s"] / max(1, row["step"]), 3) for stage, row in last.items()}


def add_reproduction(out: Path, other: Path) -> dict[str, Any]:
    """Record in `out`'s splitvlm.json and card a second run (`other`) of the same command."""
    meta = json.loads((out / NOTICE_FILE).read_text())
    theirs = json.loads((other / NOTICE_FILE).read_text())
    meta["reproduction"] = {
        "folder": str(other),
        "train_seconds": theirs["train_seconds"],
        "weights_sha256": sha256_file(other / WEIGHTS_FILE),
        "heldout": theirs["heldout"],
    }
    (out / NOTICE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(model_card(out))
    return meta["reproduction"]


def model_card(out: Path) -> str:
    """The model card (README.md) of the checkpoint in `out`, from its splitvlm.json."""
    meta = json.loads((out / NOTICE_FILE).read_text())
    cfg = TrainConfig(**meta["train"])
    held = meta["heldout"]
    per_type = held["per_type"]
    rows = "\n".join(f"| {q} | {acc:.1%} |" for q, acc in per_type.items())
    steps = meta.get("step_seconds", {})
    n_params = sum(math.prod(shape) for shape in _tensor_shapes(out / WEIGHTS_FILE))
    threads = meta.get("torch_threads", cfg.threads)
    command = (
        f"splitvlm train-reference --out shared/models/reference-llava --vision-steps {cfg.vision_steps} "
        f"--steps {cfg.steps} --seed {cfg.seed} --threads {cfg.threads}"
    )
    repro = meta.get("reproduction")
    if repro:
        same = repro["weights_sha256"] == meta["weights_sha256"]
        r_per = repro["heldout"]["per_type"]
        repro_text = f"""## Reproducibility

A second run of the same command (same seed, same machine, into `{repro["folder"]}`) took
{repro["train_seconds"] / 60:.1f} min and scored **{repro["heldout"]["accuracy"]:.1%}** held-out
({", ".join(f"{q} {a:.1%}" for q, a in r_per.items())}) against {held["accuracy"]:.1%} here
(difference {100 * (repro["heldout"]["accuracy"] - held["accuracy"]):+.1f} points). Its weights'
sha256 is `{repro["weights_sha256"]}`: {"bit-identical to" if same else "different from"} the
shipped weights. Training is deterministic for a seed on one machine and thread count; other
CPUs or thread counts change float rounding, so expect the accuracy, not the bytes, to repeat.
"""
    else:
        repro_text = ""
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [llava, splitvlm, synthetic, reference-model]
---

# {REFERENCE_NAME}

A small `LlavaForConditionalGeneration` trained **from scratch** on splitvlm's synthetic
scenes (coloured circles, squares, triangles and stars over crops of real photographs,
`shared/reference/scenes.py`), so that feature compression can be scored on a model with
real, trained weights while model hubs are out of reach. It knows nothing else: ask it about
a photograph and it answers as if it were one of its scenes.

| part | architecture |
|---|---|
| vision tower | CLIP ViT {IMAGE_SIZE}px, patch {PATCH_SIZE}, hidden {VISION_HIDDEN}, {VISION_LAYERS} layers |
| visual tokens | {TOKENS_PER_IMAGE} per image (last layer, CLS dropped) |
| projector | 2-layer MLP, GELU, {VISION_HIDDEN} → {TEXT_HIDDEN} |
| language model | Llama, hidden {TEXT_HIDDEN}, {TEXT_LAYERS} layers |
| tokenizer | word-level WordPiece over the scene vocabulary + characters |
| parameters | {n_params:,} (float32) |
| weights | `{WEIGHTS_FILE}`, sha256 `{meta["weights_sha256"]}` |

## Training

```bash
{command}
```

Two stages (`shared/reference/train.py`), on freshly generated scenes every step (seeds
{cfg.seed * 1_000_000} upwards; the held-out seeds start at 10,000,000 and are never drawn):

1. **Vision tower**, {cfg.vision_steps} steps × {cfg.vision_images_per_step} images, AdamW lr {cfg.vision_lr}:
   a linear probe on every patch feature must name the colour and shape of the object covering
   the patch, flag the patch holding an object's centre, and give that object's position
   (deep supervision from the scenes' ground truth; the probe is discarded). Position embeddings
   start as 2-D sine-cosine tables.
2. **Projector + language model**, vision tower frozen, {cfg.steps} steps × {cfg.images_per_step} images ×
   {cfg.questions_per_image} questions, AdamW lr {cfg.lr}: cross-entropy on the answer tokens, plus
   - a grounding loss that rewards the last layer's attention (from the answer position) on the
     patches of the objects the question names (for "is A left of B?", half the heads on A and
     half on B; counts on the counted objects' centre patches);
   - per-layer linear probes (weight {cfg.image_probe_weight:g}, discarded afterwards) on what each
     language-model layer sees at the image tokens, against the same per-patch targets as
     stage 1, so that the projector keeps colour as readable as shape.

Cosine schedules to {cfg.min_lr_ratio:g}× the peak after {cfg.warmup} warm-up steps, weight decay
{cfg.weight_decay}. Wall time {meta["train_seconds"] / 60:.1f} min on {threads} torch thread(s)
({platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}); mean step
time {", ".join(f"{stage} {sec:.2f} s" for stage, sec in steps.items())} (wall clock, so it includes
whatever else the machine ran at the time). The loss/accuracy log is `train_log.jsonl`.

## Held-out accuracy (unsplit, exact match)

`splitvlm eval --model builtin:reference-llava --images {held["n"] // 2}` on {held["n"]} questions
({held["n"] // 2} held-out scenes × 2):

| question type | accuracy |
|---|---|
{rows}
| **overall** | **{held["accuracy"]:.1%}** |

{repro_text}"""


def _tensor_shapes(path: Path) -> list[tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return [tuple(f.get_slice(k).get_shape()) for k in f.keys()]  # noqa: SIM118
