"""`splitvlm train-reference`: train, evaluate on the held-out set, save with a model card."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.progress import Progress

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


def train_reference(out: Path, cfg: TrainConfig, console: Console, eval_images: int = 300) -> EvalResult:
    """Train, save into `out`, evaluate unsplit on the held-out set, write the model card."""
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    started = time.perf_counter()
    model, processor = train(cfg, log_path=log_path)
    train_seconds = time.perf_counter() - started
    meta = {"notice": NOTICE, "train": config_dict(cfg), "train_seconds": round(train_seconds, 1)}
    save_reference_model(model, processor, out, card="(evaluating)", meta=meta)
    with Progress(console=console) as progress:
        result = evaluate_unsplit(out, heldout_items(eval_images), progress)
    meta["heldout"] = result.to_dict()
    (out / "splitvlm.json").write_text(json.dumps({"name": REFERENCE_NAME, **meta}, indent=2) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(model_card(cfg, result, train_seconds, n_params))
    return result


def model_card(cfg: TrainConfig, result: EvalResult, train_seconds: float, n_params: int) -> str:
    rows = "\n".join(f"| {q} | {acc:.1%} |" for q, acc in result.per_type().items())
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [llava, splitvlm, synthetic, reference-model]
---

# {REFERENCE_NAME}

A small `LlavaForConditionalGeneration` trained **from scratch** on splitvlm's synthetic
scenes (coloured circles, squares, triangles and stars over crops of real photographs,
`shared/reference/scenes.py`), so that feature compression can be scored on a model with
real, trained weights while model hubs are out of reach. It knows nothing else.

| part | architecture |
|---|---|
| vision tower | CLIP ViT {IMAGE_SIZE}px, patch {PATCH_SIZE}, hidden {VISION_HIDDEN}, {VISION_LAYERS} layers |
| visual tokens | {TOKENS_PER_IMAGE} per image (last layer, CLS dropped) |
| projector | 2-layer MLP, GELU, {VISION_HIDDEN} → {TEXT_HIDDEN} |
| language model | Llama, hidden {TEXT_HIDDEN}, {TEXT_LAYERS} layers |
| tokenizer | word-level WordPiece over the scene vocabulary + characters |
| parameters | {n_params:,} (float32) |

## Training

```bash
splitvlm train-reference --out shared/models/reference-llava \\
    --vision-steps {cfg.vision_steps} --steps {cfg.steps} --seed {cfg.seed}
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
{cfg.weight_decay}. Trained in {train_seconds / 60:.1f} min on {torch.get_num_threads()} CPU threads
({platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}).
Training is deterministic for a given seed on a given machine. The loss/accuracy log is
`train_log.jsonl`.

## Held-out accuracy (unsplit, exact match)

`splitvlm eval --model builtin:reference-llava` on {len(result.expected)} questions
({len(result.expected) // 2} held-out scenes × 2):

| question type | accuracy |
|---|---|
{rows}
| **overall** | **{result.accuracy:.1%}** |
"""
