"""Idefics3 / SmolVLM checkpoints with random weights, generated locally (nothing is downloaded).

Two builders:

- `build_tiny_idefics3(out_dir)`: a tiny, deterministic checkpoint for tests — a SigLIP-style
  vision transformer on 32x32 tiles (patch 8: 16 patches per tile, hidden 32, 2 layers),
  the Idefics3 connector (pixel shuffle x2 → 4 tokens per tile, Linear 128 → 64) and a Llama
  text model (hidden 64, 2 layers) over a small word-level tokenizer. The image processor
  resizes the longest edge to 96 px and splits it into 32x32 tiles (up to 3x3 + a global
  tile), exactly as SmolVLM's processor does at 2048/512 px, so the prompt has the real
  ``<fake_token_around_image><row_i_col_j><image>...<global-img>`` layout. ``architecture``
  picks `Idefics3ForConditionalGeneration` (what SmolVLM-256M/500M-Instruct use) or
  `SmolVLMForConditionalGeneration` (SmolVLM2). Every byte of the weights is a function of
  ``seed``: they are drawn with NumPy's PCG64, as in `shared.models.tiny_llava`.
- `build_smolvlm_random(out_dir)`: the real SmolVLM-256M-Instruct architecture, tokenizer,
  chat template and processor (read from a folder holding its config and processor files but
  no weights, `SMOLVLM_256M_DIR` by default) with random weights; ``text_layers`` /
  ``vision_layers`` shrink only the depth, for tests that need the real tiling and prompt
  expansion without the cost of the full model.

Both folders load offline with ``from_pretrained`` and `AutoProcessor.from_pretrained`. The
processor is always `Idefics3Processor`: `SmolVLMProcessor` needs ``num2words`` and a
torchvision video processor, neither of which this project installs; for images the two
expand prompts identically.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMVisionConfig,
)
from transformers.utils import logging as hf_logging

from shared.models.card import NOTICE_FILE
from shared.models.tiny_llava import WORDS
from shared.models.tokenizer import PAD_TOKEN, UNK_TOKEN, build_word_tokenizer

TINY_IDEFICS3_NAME = "tiny-idefics3-random-v1"

# The SmolVLM-256M-Instruct config/tokenizer/processor files (no weights), beside the repo.
SMOLVLM_256M_DIR = Path(__file__).resolve().parents[3] / "shared" / "models" / "smolvlm-256m-instruct"

TILE_SIZE = 32  # vision image_size = the processor's max_image_size
PATCH_SIZE = 8
SCALE_FACTOR = 2
LONGEST_EDGE = 3 * TILE_SIZE  # images are resized to this, then cut into up to 3x3 tiles
VISION_HIDDEN = 32
TEXT_HIDDEN = 64
PATCHES_PER_TILE = (TILE_SIZE // PATCH_SIZE) ** 2  # 16
IMAGE_SEQ_LEN = PATCHES_PER_TILE // SCALE_FACTOR**2  # 4 tokens per tile after the connector
VISION_INIT_STD = 0.1
TEXT_INIT_STD = 0.2

BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<end_of_utterance>"
IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
MAX_GRID = 6  # <row_i_col_j> tokens exist for i, j in 1..6, as in the SmolVLM tokenizer
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    UNK_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    FAKE_IMAGE_TOKEN,
    GLOBAL_IMAGE_TOKEN,
    *(f"<row_{i}_col_{j}>" for i in range(1, MAX_GRID + 1) for j in range(1, MAX_GRID + 1)),
)

# SmolVLM-Instruct's chat template (images and text of each turn, in order).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

NOTICE = (
    "splitvlm tiny Idefics3/SmolVLM: RANDOM weights (seeded), for tests only. Its answers are meaningless."
)

_ARCHITECTURES: dict[str, tuple[Any, Any, Any]] = {
    # name → (config class, vision config class, model class)
    "idefics3": (Idefics3Config, Idefics3VisionConfig, Idefics3ForConditionalGeneration),
    "smolvlm": (SmolVLMConfig, SmolVLMVisionConfig, SmolVLMForConditionalGeneration),
}


def _save_model(model: Any, out_dir: Path) -> None:
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar on stderr
    try:
        model.save_pretrained(out_dir)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    for f in out_dir.glob("*.safetensors"):
        f.chmod(0o644)  # safetensors writes 0600; the checkpoint is meant to be shared


def _fill_weights(model: torch.nn.Module, seed: int) -> None:
    """Machine-independent values (see `shared.models.tiny_llava._fill_weights`).

    Norm weights 1, biases 0, everything else uniform in ``[-a, a]`` (``a = sqrt(3) * std``)
    from NumPy's PCG64, in sorted parameter-name order.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("bias"):
                param.zero_()
            elif "norm" in name:  # layer_norm*, post_layernorm, RMSNorm weights
                param.fill_(1.0)
            else:
                text = name.startswith(("model.text_model.", "lm_head."))
                bound = math.sqrt(3.0) * (TEXT_INIT_STD if text else VISION_INIT_STD)
                values = (rng.random(param.numel()) * 2.0 - 1.0) * bound
                param.copy_(torch.from_numpy(values.astype(np.float32).reshape(tuple(param.shape))))


def _silence_special_tokens(model: Any, tokenizer: Any) -> None:
    """Zero the logits of special tokens (EOS, image tokens, ...): random weights would emit them
    at arbitrary steps; this way greedy generation always runs to max_new_tokens."""
    with torch.no_grad():
        special_ids = sorted({int(i) for i in tokenizer.all_special_ids})
        model.lm_head.weight[special_ids] = 0.0


def build_tiny_idefics3(
    out_dir: Path, seed: int = 0, *, architecture: str = "idefics3", image_splitting: bool = True
) -> Path:
    """Write a tiny random Idefics3 (or SmolVLM) checkpoint into ``out_dir`` (created); return it.

    ``image_splitting=False`` makes the processor send one 32x32 tile per image (rows = cols = 0),
    the other prompt layout. Deterministic: the same arguments give byte-identical weights.
    """
    if architecture not in _ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(_ARCHITECTURES)}, got {architecture!r}")
    config_cls, vision_config_cls, model_cls = _ARCHITECTURES[architecture]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_word_tokenizer(
        list(WORDS),
        special_tokens=SPECIAL_TOKENS,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        add_bos=False,  # the chat template starts with <|im_start|>, as SmolVLM's tokenizer
        model_max_length=2048,
    )
    ids: dict[str, int] = {}
    for token in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN):
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert isinstance(token_id, int)
        ids[token] = token_id
    vision = vision_config_cls(
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TILE_SIZE,
        patch_size=PATCH_SIZE,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        tie_word_embeddings=False,
    )
    config = config_cls(
        vision_config=vision,
        text_config=text,
        scale_factor=SCALE_FACTOR,
        image_token_id=ids[IMAGE_TOKEN],
        tie_word_embeddings=False,
        pad_token_id=ids[PAD_TOKEN],
    )

    model = model_cls(config).eval()
    _fill_weights(model, seed)
    _silence_special_tokens(model, tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS_TOKEN], eos_token_id=ids[EOS_TOKEN], pad_token_id=ids[PAD_TOKEN], do_sample=False
    )
    _save_model(model, out_dir)

    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": LONGEST_EDGE},
        max_image_size={"longest_edge": TILE_SIZE},
        do_image_splitting=image_splitting,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)

    (out_dir / NOTICE_FILE).write_text(
        json.dumps({"notice": NOTICE, "name": TINY_IDEFICS3_NAME}, indent=2) + "\n"
    )
    (out_dir / "README.md").write_text(
        f"# {TINY_IDEFICS3_NAME} ({architecture})\n\n**Random weights (seed {seed}); answers are "
        "meaningless.** Built by `shared.models.tiny_idefics3.build_tiny_idefics3` for tests.\n"
    )
    return out_dir


# Files of a hub checkpoint folder other than the weights (config, tokenizer, processor).
_SMOLVLM_FILES = (
    "config.json",
    "generation_config.json",
    "added_tokens.json",
    "chat_template.json",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
)


def build_smolvlm_random(
    out_dir: Path,
    *,
    source: Path | None = None,
    text_layers: int | None = None,
    vision_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    silence_special_tokens: bool = True,
) -> Path:
    """The SmolVLM-256M-Instruct architecture with random weights, written to ``out_dir``.

    ``source`` (default `SMOLVLM_256M_DIR`) holds the real config, tokenizer and processor
    files; they are copied as they are, except that ``text_layers`` / ``vision_layers`` (when
    given) replace the depths and the stored dtype becomes ``dtype``. Weights come from
    transformers' own initialisation under ``torch.manual_seed(seed)``; with
    ``silence_special_tokens`` the logits of special tokens are zeroed (see
    `build_tiny_idefics3`). FileNotFoundError when ``source`` lacks a file.
    """
    source = Path(source) if source is not None else SMOLVLM_256M_DIR
    missing = [name for name in ("config.json", "tokenizer.json") if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{source} lacks {', '.join(missing)} (SmolVLM config/processor files)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _SMOLVLM_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)

    config = AutoConfig.from_pretrained(source)
    if text_layers is not None:
        config.text_config.num_hidden_layers = int(text_layers)
    if vision_layers is not None:
        config.vision_config.num_hidden_layers = int(vision_layers)
    model_cls = _ARCHITECTURES.get(str(config.model_type), _ARCHITECTURES["idefics3"])[2]
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if silence_special_tokens:
        from transformers import AutoTokenizer

        _silence_special_tokens(model, AutoTokenizer.from_pretrained(source))
    model.to(dtype)
    _save_model(model, out_dir)
    shutil.copyfile(source / "generation_config.json", out_dir / "generation_config.json")
    (out_dir / NOTICE_FILE).write_text(
        json.dumps({"notice": NOTICE, "name": "smolvlm-256m-random"}, indent=2) + "\n"
    )
    return out_dir
