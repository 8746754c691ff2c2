"""The reference VLM's architecture: a small LLaVA (CLIP ViT + 2-layer MLP + Llama).

`new_reference_model()` makes the untrained model with its tokenizer and processor;
`save_reference_model()` writes a Hugging Face checkpoint folder that
`LlavaForConditionalGeneration.from_pretrained` / `AutoProcessor.from_pretrained`
load offline like any hub checkpoint.

    128x128 image ─► CLIP ViT (patch 8, 256 patches + CLS) ─► last layer, CLS dropped
                  ─► 256 tokens x 128 ─► MLP ─► 256 tokens x 192 ─► Llama (3 layers) ─► answer
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from shared.models.card import NOTICE_FILE
from shared.models.tiny_llava import CHAT_TEMPLATE
from shared.models.tokenizer import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN, build_word_tokenizer
from shared.reference.scenes import vocabulary

REFERENCE_NAME = "splitvlm-reference-llava-v1"
IMAGE_SIZE = 128
PATCH_SIZE = 8
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 256; CLS dropped by the "default" strategy
VISION_HIDDEN = 128
VISION_LAYERS = 4
TEXT_HIDDEN = 192
TEXT_LAYERS = 3

# Words of the chat template, so that the prompt is whole-word tokens.
_TEMPLATE_WORDS = ("user", "assistant")


def reference_tokenizer() -> PreTrainedTokenizerFast:
    return build_word_tokenizer([*_TEMPLATE_WORDS, *vocabulary()], model_max_length=1024)


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    value = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(value, int)
    return value


def reference_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=4 * VISION_HIDDEN,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=VISION_HIDDEN,
        hidden_act="quick_gelu",
        attention_dropout=0.0,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=3 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=6,
        num_key_value_heads=6,
        max_position_embeddings=512,
        bos_token_id=token_id(tokenizer, BOS_TOKEN),
        eos_token_id=token_id(tokenizer, EOS_TOKEN),
        pad_token_id=token_id(tokenizer, PAD_TOKEN),
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=token_id(tokenizer, IMAGE_TOKEN),
        image_seq_length=TOKENS_PER_IMAGE,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        # The last layer: with a model trained from scratch every layer should do work.
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def reference_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def new_reference_model(seed: int) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    tokenizer = reference_tokenizer()
    config = reference_config(tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=token_id(tokenizer, BOS_TOKEN),
        eos_token_id=token_id(tokenizer, EOS_TOKEN),
        pad_token_id=token_id(tokenizer, PAD_TOKEN),
        do_sample=False,
        max_new_tokens=4,
    )
    return model, reference_processor(tokenizer)


def save_reference_model(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    out_dir: Path,
    card: str,
    meta: dict[str, Any],
) -> Path:
    """Write the checkpoint (float32 weights), processor, model card and splitvlm.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    for weights in out_dir.glob("*.safetensors"):
        to_hub_layout(weights)
    processor.save_pretrained(out_dir)
    (out_dir / NOTICE_FILE).write_text(json.dumps({"name": REFERENCE_NAME, **meta}, indent=2) + "\n")
    (out_dir / "README.md").write_text(card)
    for f in out_dir.glob("*.safetensors"):
        f.chmod(0o644)
    return out_dir


def to_hub_layout(path: Path) -> None:
    """Rename ``vision_tower.*`` to the hub's ``vision_tower.vision_model.*`` in place.

    transformers 5 saves a LLaVA's CLIP tower without the ``vision_model.`` level that hub
    checkpoints (llava-hf/*) have; transformers loads both, but other tools (vLLM) load only the
    hub layout. Idempotent.
    """
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    inner = "vision_tower.vision_model."
    renamed = {
        (
            inner + k.removeprefix("vision_tower.")
            if k.startswith("vision_tower.") and not k.startswith(inner)
            else k
        ): v
        for k, v in state.items()
    }
    if renamed.keys() != state.keys():
        save_file(renamed, str(path), metadata={"format": "pt"})
