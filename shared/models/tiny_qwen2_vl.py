"""Tiny Qwen2-VL / Qwen2.5-VL checkpoints with random weights, generated locally (for tests).

`build_tiny_qwen2_vl(out_dir)` and `build_tiny_qwen2_5_vl(out_dir)` write complete Hugging
Face checkpoint folders — ``config.json``, ``generation_config.json``, ``model.safetensors``,
tokenizer files, ``processor_config.json`` (image processor) and the Qwen chat template — that
`Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration.from_pretrained` and
the processor load offline. Nothing is downloaded.

As in `shared.models.tiny_llava`, the weights are random but every byte of ``model.safetensors``
is a function of ``seed`` only (NumPy PCG64, see `shared.models.tiny_llava._fill_weights`).

Sizes (both families): patch 8, temporal patch 2, spatial merge 2 (so one visual token per
16x16 pixels), images resized to between 32x32 and 96x96 pixels (``min_pixels`` 1024,
``max_pixels`` 9216): at most 144 patches / 36 visual tokens per image. Vision width 64, 2
blocks; text model hidden 128, 2 layers, M-RoPE sections (4, 6, 6). Qwen2.5-VL additionally
uses window attention (window 32 px = 2x2 merged tokens) in block 0 and full attention in
block 1, so the window reordering is exercised even on small images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)
from transformers.utils import logging as hf_logging

from shared.models.card import NOTICE_FILE
from shared.models.tiny_llava import WORDS, _fill_weights
from shared.models.tokenizer import UNK_TOKEN, build_word_tokenizer

TINY_QWEN2_VL_NAME = "tiny-qwen2-vl-random-v1"
TINY_QWEN2_5_VL_NAME = "tiny-qwen2.5-vl-random-v1"

PATCH_SIZE = 8
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
MIN_PIXELS = 32 * 32
MAX_PIXELS = 96 * 96
VISION_HIDDEN = 64  # width of the vision blocks: the after_vision_tower feature dim
TEXT_HIDDEN = 128  # the merger's output: the after_projector feature dim
WINDOW_SIZE = 32  # Qwen2.5-VL window attention, in pixels
MROPE_SECTION = (4, 6, 6)  # sums to head_dim / 2 = 128 / 4 / 2

# Qwen's special tokens (the names the processor and the chat template use).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# Order fixes the ids.
SPECIAL_TOKENS = (ENDOFTEXT, UNK_TOKEN, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# The chat template of Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FAMILIES: dict[str, dict[str, str]] = {
    "qwen2_vl": {"name": TINY_QWEN2_VL_NAME, "processor": "Qwen2VLProcessor", "title": "Qwen2-VL"},
    "qwen2_5_vl": {"name": TINY_QWEN2_5_VL_NAME, "processor": "Qwen2_5_VLProcessor", "title": "Qwen2.5-VL"},
}


def _text_config(vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 2 * TEXT_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": list(MROPE_SECTION),
        },
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
        "tie_word_embeddings": False,
    }


def _config(model_type: str, vocab_size: int, ids: dict[str, int]) -> Qwen2VLConfig | Qwen2_5_VLConfig:
    common: dict[str, Any] = {
        "text_config": _text_config(vocab_size, ids),
        "image_token_id": ids[IMAGE_PAD],
        "video_token_id": ids[VIDEO_PAD],
        "vision_start_token_id": ids[VISION_START],
        "vision_end_token_id": ids[VISION_END],
        "tie_word_embeddings": False,
    }
    vision: dict[str, Any] = {
        "depth": 2,
        "num_heads": 4,
        "in_channels": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }
    if model_type == "qwen2_vl":
        vision.update(embed_dim=VISION_HIDDEN, hidden_size=TEXT_HIDDEN, mlp_ratio=2)
        return Qwen2VLConfig(vision_config=vision, **common)
    if model_type == "qwen2_5_vl":
        vision.update(
            hidden_size=VISION_HIDDEN,
            intermediate_size=2 * VISION_HIDDEN,
            out_hidden_size=TEXT_HIDDEN,
            window_size=WINDOW_SIZE,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        )
        return Qwen2_5_VLConfig(vision_config=vision, **common)
    raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(FAMILIES)}")


def build_tiny_qwen_vl(out_dir: Path, model_type: str = "qwen2_vl", seed: int = 0) -> Path:
    """Write a tiny random ``model_type`` (``qwen2_vl`` or ``qwen2_5_vl``) checkpoint into ``out_dir``.

    Deterministic: the same arguments give byte-identical ``model.safetensors``.
    """
    if model_type not in FAMILIES:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_word_tokenizer(
        [*WORDS, "helpful", "video"],
        special_tokens=SPECIAL_TOKENS,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        add_bos=False,
        model_max_length=4096,
    )
    ids: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert isinstance(token_id, int)
        ids[token] = token_id
    config = _config(model_type, len(tokenizer), ids)

    model: Qwen2VLForConditionalGeneration | Qwen2_5_VLForConditionalGeneration = (
        Qwen2VLForConditionalGeneration(config)  # type: ignore[arg-type]
        if model_type == "qwen2_vl"
        else Qwen2_5_VLForConditionalGeneration(config)  # type: ignore[arg-type]
    )
    model.eval()
    _fill_weights(model, seed)
    with torch.no_grad():
        # The merger's first op is a norm: unit weights, as `_fill_weights` gives the other norms.
        model.model.visual.merger.ln_q.weight.fill_(1.0)
        # Zero logits for special tokens (EOS included): generation runs to max_new_tokens.
        special_ids = sorted({int(i) for i in tokenizer.all_special_ids})
        model.lm_head.weight[special_ids] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=[ids[IM_END], ids[ENDOFTEXT]],
        pad_token_id=ids[ENDOFTEXT],
        do_sample=False,
    )
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
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
    # The processor classes need a video processor, which needs torchvision; write the files a
    # hub checkpoint has (tokenizer, processor_config.json with the image processor, chat
    # template) directly. `shared.split.qwen2_vl.load_processor` loads them with or without
    # torchvision.
    tokenizer.save_pretrained(out_dir)
    image_config = image_processor.to_dict()
    image_config["image_processor_type"] = "Qwen2VLImageProcessor"
    image_config.pop("processor_class", None)
    (out_dir / "processor_config.json").write_text(
        json.dumps({"image_processor": image_config, "processor_class": family["processor"]}, indent=2) + "\n"
    )
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    tokenizer_config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    tokenizer_config["processor_class"] = family["processor"]
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")

    notice = (
        f"splitvlm tiny {family['title']}: RANDOM weights (seeded), for tests only. "
        "Its answers are meaningless."
    )
    (out_dir / NOTICE_FILE).write_text(
        json.dumps({"notice": notice, "name": family["name"]}, indent=2) + "\n"
    )
    (out_dir / "README.md").write_text(_model_card(family, seed, model))
    for f in out_dir.glob("*.safetensors"):
        f.chmod(0o644)
    return out_dir


def build_tiny_qwen2_vl(out_dir: Path, seed: int = 0) -> Path:
    """The tiny random Qwen2-VL (`Qwen2VLForConditionalGeneration`) checkpoint."""
    return build_tiny_qwen_vl(out_dir, "qwen2_vl", seed)


def build_tiny_qwen2_5_vl(out_dir: Path, seed: int = 0) -> Path:
    """The tiny random Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) checkpoint."""
    return build_tiny_qwen_vl(out_dir, "qwen2_5_vl", seed)


def _model_card(family: dict[str, str], seed: int, model: torch.nn.Module) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [qwen2_vl, random-weights, test-model, splitvlm]
---

# {family["name"]}

**The weights of this model are random. Its answers are meaningless.**

A tiny {family["title"]} generated locally by `shared.models.tiny_qwen2_vl` (seed {seed}) for
the split-inference tests; nothing was trained or downloaded.

| part | size |
|---|---|
| vision blocks | patch {PATCH_SIZE}, temporal patch {TEMPORAL_PATCH_SIZE}, width {VISION_HIDDEN}, 2 blocks |
| patch merger | {MERGE_SIZE}x{MERGE_SIZE} patches → one token of {TEXT_HIDDEN} |
| language model | hidden {TEXT_HIDDEN}, 2 layers, 4 heads (2 KV), M-RoPE sections {list(MROPE_SECTION)} |
| images | resized to {MIN_PIXELS} .. {MAX_PIXELS} pixels (multiples of {PATCH_SIZE * MERGE_SIZE}) |

Total parameters: {n_params:,}. The logits of special tokens are zeroed, so generation
never stops early.
"""
