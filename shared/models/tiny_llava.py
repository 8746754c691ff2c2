"""The embedded default model: a tiny LLaVA with random weights, generated locally.

`build_tiny_llava(out_dir)` writes a complete Hugging Face checkpoint folder —
``config.json``, ``generation_config.json``, ``model.safetensors``, tokenizer files,
image-processor and processor configs (with the chat template), a README model
card and ``splitvlm.json`` — that `LlavaForConditionalGeneration.from_pretrained`
and `AutoProcessor.from_pretrained` load offline like a hub checkpoint. Nothing is
downloaded.

The weights are random (seeded, drawn with NumPy's PCG64 so that they do not depend
on the CPU or the torch version): answers are meaningless, but every byte of the
folder is a function of ``seed`` (and the transformers version's config/serialisation
format) only, so Tx and Rx machines that build it independently hold the same model
(same fingerprint).

Sizes: CLIP vision tower 64x64 images, patch 8 (64 patches + CLS), hidden 64, 2 layers;
2-layer GELU MLP projector 64 → 128; Llama text model hidden 128, 2 layers. With
``vision_feature_layer=-2`` and the ``default`` strategy each image gives 64 visual
tokens of dim 64 (after the vision tower) or 128 (after the projector).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.utils import logging as hf_logging

from shared.models.card import NOTICE_FILE
from shared.models.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    build_word_tokenizer,
)

TINY_LLAVA_NAME = "tiny-llava-random-v1"

IMAGE_SIZE = 64
PATCH_SIZE = 8
VISION_HIDDEN = 64
TEXT_HIDDEN = 128
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2  # CLS dropped by the "default" strategy
# Spread of the random weights; larger than real inits so that the output depends on the input.
VISION_INIT_STD = 0.1
TEXT_INIT_STD = 0.2

NOTICE = (
    "splitvlm built-in tiny LLaVA: RANDOM weights (seeded), for tests and demos only. "
    "Its answers are meaningless."
)

# LLaVA-1.5 style single-turn template: "USER: <image>\n{text} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% else %}{{ message['role'] | upper }}: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% else %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# The tokenizer's words: a fixed list, so the vocabulary (and every id) never changes.
_WORDS_TEXT = """
    user assistant system image picture photo
    the a an and or but not no yes of to in on at by for with from as into over under
    is are was were be been being has have had do does did can could will would should may might must
    i you he she it we they me him her us them my your his its our their this that these those
    what which who whom whose where when why how there here
    all any both each few more most other some such only own same so than too very just also
    one two three four five six seven eight nine ten many much lot little big small large tiny
    red green blue yellow orange purple pink brown black white gray grey color colour colors
    dark light bright pale shade gradient noise pattern solid striped dotted plain texture
    left right top bottom middle center centre corner edge side front back up down
    person people man woman child boy girl dog cat bird horse car bus bike tree flower house
    street road sky cloud sun water sea river grass field mountain table chair book cup
    describe describes description show shows shown see seen look looks looking appear appears
    contain contains containing depict depicts scene object objects thing things shape shapes
    square circle line lines dot dots box area region part background foreground
    answer question tell explain count name read write say said think know
    good bad new old first last long short high low hot cold full empty open closed
    day night time year way word words text number numbers
    please thank thanks hello hi okay sure sorry
"""
WORDS: tuple[str, ...] = tuple(_WORDS_TEXT.split())


def _config(vocab_size: int, bos_id: int, eos_id: int, pad_id: int, image_id: int) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=4 * VISION_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=VISION_HIDDEN,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        image_seq_length=TOKENS_PER_IMAGE,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )


def _fill_weights(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with values that are the same on every machine.

    torch's CPU RNG kernels (``normal_`` is vectorised) may differ across CPU types, and the
    Tx (an edge device) and the Rx (a server) must build byte-identical checkpoints. So:
    norm weights are 1, biases 0, and every other tensor is uniform in ``[-a, a]`` (``a =
    sqrt(3) * std``) from NumPy's PCG64 ``random()`` — integer arithmetic plus exactly
    rounded IEEE operations — in sorted parameter-name order.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("bias"):
                param.zero_()
            elif "norm" in name:  # layer_norm*, pre_layrnorm, post_layernorm, RMSNorm weights
                param.fill_(1.0)
            else:
                text = name.startswith(("model.language_model.", "lm_head."))
                bound = math.sqrt(3.0) * (TEXT_INIT_STD if text else VISION_INIT_STD)
                values = (rng.random(param.numel()) * 2.0 - 1.0) * bound
                param.copy_(torch.from_numpy(values.astype(np.float32).reshape(tuple(param.shape))))


def build_tiny_llava(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny random LLaVA checkpoint into ``out_dir`` (created) and return it.

    Deterministic: the same ``seed`` gives byte-identical ``model.safetensors``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_word_tokenizer(list(WORDS), model_max_length=1024)
    ids: dict[str, int] = {}
    for token in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN):
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert isinstance(token_id, int)
        ids[token] = token_id
    config = _config(len(tokenizer), ids[BOS_TOKEN], ids[EOS_TOKEN], ids[PAD_TOKEN], ids[IMAGE_TOKEN])

    model = LlavaForConditionalGeneration(config)
    model.eval()
    _fill_weights(model, seed)
    with torch.no_grad():
        # Random weights would emit special tokens (EOS included) at arbitrary steps; give
        # them zero logits so that generation always runs to max_new_tokens and the
        # equivalence tests compare real token sequences.
        special_ids = sorted({int(i) for i in tokenizer.all_special_ids})
        model.lm_head.weight[special_ids] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        do_sample=False,
    )
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar on stderr
    try:
        model.save_pretrained(out_dir)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, removed again by the "default" strategy
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(out_dir)

    (out_dir / NOTICE_FILE).write_text(
        json.dumps({"notice": NOTICE, "name": TINY_LLAVA_NAME}, indent=2) + "\n"
    )
    (out_dir / "README.md").write_text(_model_card(seed, model))
    for f in out_dir.glob("*.safetensors"):
        f.chmod(0o644)  # safetensors writes 0600; the checkpoint is meant to be shared
    return out_dir


def _model_card(seed: int, model: LlavaForConditionalGeneration) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [llava, random-weights, test-model, splitvlm]
---

# {TINY_LLAVA_NAME}

**The weights of this model are random. Its answers are meaningless.**

This is the built-in default model of splitvlm, generated locally by
`shared.models.tiny_llava.build_tiny_llava(seed={seed})` — nothing was trained or
downloaded. It exists so that the split Tx/Rx pipeline can run and be tested
offline on any machine; the same seed always produces byte-identical weights.

| part | architecture | size |
|---|---|---|
| vision tower | CLIP ViT, {IMAGE_SIZE}px, patch {PATCH_SIZE} | hidden {VISION_HIDDEN}, 2 layers, 4 heads |
| projector | 2-layer MLP, GELU | {VISION_HIDDEN} → {TEXT_HIDDEN} |
| language model | Llama | hidden {TEXT_HIDDEN}, 2 layers, 4 heads (2 KV) |
| tokenizer | WordPiece over a fixed {len(WORDS)}-word list + characters | |

Total parameters: {n_params:,}. Each image becomes {TOKENS_PER_IMAGE} visual tokens
(`vision_feature_layer=-2`, `vision_feature_select_strategy="default"`).
The logits of special tokens (EOS included) are zeroed, so generation never stops early.

Load with `LlavaForConditionalGeneration.from_pretrained(folder)` and
`AutoProcessor.from_pretrained(folder)`.
"""
