"""A tiny Qwen3-VL with random weights, generated locally (for the Qwen3-VL split tests).

`build_tiny_qwen3_vl(out_dir)` writes a complete Hugging Face checkpoint folder —
``config.json``, ``generation_config.json``, ``model.safetensors``, tokenizer files, the
processor config (image + video processor) with a Qwen-style chat template, a README
model card and ``splitvlm.json`` — that `Qwen3VLForConditionalGeneration.from_pretrained`
loads offline like a hub checkpoint. Nothing is downloaded. ``moe=True`` writes the
mixture-of-experts variant (`Qwen3VLMoeForConditionalGeneration`) instead.

The weights are random (seeded, drawn with NumPy's PCG64 as in `shared.models.tiny_llava`,
so they do not depend on the CPU or the torch version): answers are meaningless, but the
folder is a function of ``seed`` (and the transformers version's serialisation) only.

Sizes: vision encoder patch 8, merge 2 (so 16x16 pixels per language-model token), hidden
32, 3 blocks, deepstack taps after blocks 0 and 1; text model hidden 64, 3 layers (the two
deepstack levels are added after layers 0 and 1). Images are resized to sides that are
multiples of 16 and an area between 32² and 64² pixels: 4 to 16 language-model tokens (16 to 64
patches) per image.

Without torchvision, transformers cannot build Qwen3-VL's video processor and so neither
`AutoProcessor`; `shared.split.qwen3_vl.load_processor` then loads an image-only processor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

from shared.models.card import NOTICE_FILE
from shared.models.tiny_llava import WORDS
from shared.models.tokenizer import build_word_tokenizer

TINY_QWEN3_VL_NAME = "tiny-qwen3-vl-random-v1"
TINY_QWEN3_VL_MOE_NAME = "tiny-qwen3-vl-moe-random-v1"

PATCH_SIZE = 8
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
VISION_HIDDEN = 32
VISION_DEPTH = 3
DEEPSTACK_VISUAL_INDEXES = (0, 1)
TEXT_HIDDEN = 64
TEXT_LAYERS = 3
# Image sizes in pixels (the processor resizes into this range, to multiples of patch x merge).
MIN_PIXELS = 32 * 32
MAX_PIXELS = 64 * 64
# Spread of the random weights; larger than real inits so that the output depends on the input.
VISION_INIT_STD = 0.1
TEXT_INIT_STD = 0.2

PAD_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# Order fixes the ids (0..7).
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# Qwen chat format: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\n
# <|im_start|>assistant\n" (the processor expands each <|image_pad|> to the image's token count).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _config(vocab_size: int, ids: dict[str, int], moe: bool) -> Qwen3VLConfig | Qwen3VLMoeConfig:
    vision: dict[str, Any] = {
        "depth": VISION_DEPTH,
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": 2 * VISION_HIDDEN,
        "num_heads": 2,
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "out_hidden_size": TEXT_HIDDEN,
        "num_position_embeddings": 16,  # a 4x4 learned grid, interpolated to each image's grid
        "deepstack_visual_indexes": list(DEEPSTACK_VISUAL_INDEXES),
    }
    text: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 2 * TEXT_HIDDEN,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        # M-RoPE over (t, h, w): the sections add up to head_dim / 2.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
        "pad_token_id": ids[PAD_TOKEN],
        "eos_token_id": ids[IM_END],
        "tie_word_embeddings": False,
    }
    common: dict[str, Any] = {
        "image_token_id": ids[IMAGE_PAD],
        "video_token_id": ids[VIDEO_PAD],
        "vision_start_token_id": ids[VISION_START],
        "vision_end_token_id": ids[VISION_END],
        "tie_word_embeddings": False,
    }
    if moe:
        text.update(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=TEXT_HIDDEN, decoder_sparse_step=1
        )
        return Qwen3VLMoeConfig(vision_config=vision, text_config=text, **common)
    return Qwen3VLConfig(vision_config=vision, text_config=text, **common)


def _fill_weights(model: torch.nn.Module, seed: int) -> None:
    """Platform-independent random weights (same scheme as `shared.models.tiny_llava`).

    Norm weights 1, biases 0, every other tensor uniform in ``[-a, a]`` (``a = sqrt(3) * std``)
    from NumPy's PCG64, in sorted parameter-name order.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("bias"):
                param.zero_()
            elif "norm" in name:  # norm1/norm2, merger norms, q_norm/k_norm, RMSNorm weights
                param.fill_(1.0)
            else:
                text = name.startswith(("model.language_model.", "lm_head."))
                bound = math.sqrt(3.0) * (TEXT_INIT_STD if text else VISION_INIT_STD)
                values = (rng.random(param.numel()) * 2.0 - 1.0) * bound
                param.copy_(torch.from_numpy(values.astype(np.float32).reshape(tuple(param.shape))))


def _video_processor_config() -> dict[str, Any]:
    """What `Qwen3VLVideoProcessor` needs (written by hand: building one requires torchvision)."""
    return {
        "video_processor_type": "Qwen3VLVideoProcessor",
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def build_tiny_qwen3_vl(out_dir: Path, seed: int = 0, *, moe: bool = False) -> Path:
    """Write the tiny random Qwen3-VL checkpoint into ``out_dir`` (created) and return it.

    Deterministic: the same ``seed`` (and ``moe``) gives byte-identical ``model.safetensors``.
    """
    from shared.split.qwen3_vl import ImageOnlyQwen3VLProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_word_tokenizer(
        list(WORDS),
        special_tokens=SPECIAL_TOKENS,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        add_bos=False,
        model_max_length=1024,
    )
    ids: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert isinstance(token_id, int)
        ids[token] = token_id
    config = _config(len(tokenizer), ids, moe)

    model: Qwen3VLForConditionalGeneration | Qwen3VLMoeForConditionalGeneration = (
        Qwen3VLMoeForConditionalGeneration(config)  # type: ignore[arg-type]
        if moe
        else Qwen3VLForConditionalGeneration(config)  # type: ignore[arg-type]
    )
    model.eval()
    _fill_weights(model, seed)
    with torch.no_grad():
        # Random weights would emit special tokens (EOS included) at arbitrary steps; give them
        # zero logits so that generation runs to max_new_tokens and the tests compare real text.
        special_ids = sorted({int(i) for i in tokenizer.all_special_ids} | set(ids.values()))
        model.lm_head.weight[special_ids] = 0.0
    model.generation_config = GenerationConfig(
        eos_token_id=ids[IM_END], pad_token_id=ids[PAD_TOKEN], do_sample=False
    )
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar on stderr
    try:
        model.save_pretrained(out_dir)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )
    processor = ImageOnlyQwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    processor.save_pretrained(out_dir)
    # Make the files say what a hub Qwen3-VL checkpoint says: a full `Qwen3VLProcessor`
    # (with a video processor), so that AutoProcessor loads it where torchvision exists.
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = out_dir / name
        data = json.loads(path.read_text())
        data["processor_class"] = "Qwen3VLProcessor"
        if name == "processor_config.json":
            data["video_processor"] = _video_processor_config()
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    name = TINY_QWEN3_VL_MOE_NAME if moe else TINY_QWEN3_VL_NAME
    notice = (
        f"splitvlm {name}: RANDOM weights (seeded), for tests and demos only. Its answers are meaningless."
    )
    (out_dir / NOTICE_FILE).write_text(json.dumps({"notice": notice, "name": name}, indent=2) + "\n")
    (out_dir / "README.md").write_text(_model_card(name, seed, model, moe))
    for f in out_dir.glob("*.safetensors"):
        f.chmod(0o644)  # safetensors writes 0600; the checkpoint is meant to be shared
    return out_dir


def _model_card(name: str, seed: int, model: torch.nn.Module, moe: bool) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    arch = "Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"
    mlp = "4 experts, top-2" if moe else "dense MLP"
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [qwen3_vl, random-weights, test-model, splitvlm]
---

# {name}

**The weights of this model are random. Its answers are meaningless.**

Generated locally by `shared.models.tiny_qwen3_vl.build_tiny_qwen3_vl(seed={seed}, moe={moe})`
for the splitvlm Qwen3-VL split tests — nothing was trained or downloaded.

| part | size |
|---|---|
| vision encoder | patch {PATCH_SIZE}, merge {MERGE_SIZE}, hidden {VISION_HIDDEN}, {VISION_DEPTH} blocks |
| deepstack | taps after vision blocks {list(DEEPSTACK_VISUAL_INDEXES)}, one merger each |
| language model | hidden {TEXT_HIDDEN}, {TEXT_LAYERS} layers, {mlp} |
| tokenizer | WordPiece over a fixed {len(WORDS)}-word list + characters, Qwen special tokens |

Architecture `{arch}`; total parameters: {n_params:,}. Images are resized to sides that are
multiples of {PATCH_SIZE * MERGE_SIZE} pixels and an area of {MIN_PIXELS} to {MAX_PIXELS} pixels.
The logits of special tokens are zeroed, so generation never stops early.
"""
