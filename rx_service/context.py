"""How many tokens a prompt costs the language model, and the check that it fits its context.

    prompt + visual tokens ─► chat template ─► tokenizer ─► n prompt tokens
    n + max_new_tokens > the model's context (max_position_embeddings) ─► 400 / INVALID_ARGUMENT

The count is also `usage.prompt_tokens` on the OpenAI-compatible APIs.
"""

from __future__ import annotations

from typing import Any

from shared.errors import BadRequestError
from shared.split import GenerationOptions, RxHalf, VisionFeatures


def prompt_tokens(half: RxHalf, prompt: str, features: VisionFeatures) -> int:
    """Tokens of the full prompt (template, image tokens, question) the language model reads."""
    tokenizer: Any = getattr(half, "tokenizer", None)
    prompt_text: Any = getattr(half, "prompt_text", None)
    if tokenizer is not None and prompt_text is not None:
        try:  # LLaVA and Qwen3-VL: prompt_text(prompt, tokens_per_image)
            text = prompt_text(prompt, features.tokens_per_image)
            return len(tokenizer(text, add_special_tokens=True)["input_ids"])
        except TypeError:
            pass
    inputs = half.build_inputs(prompt, features)  # other families: their own expansion
    return int(inputs["input_ids"].shape[-1])


def context_length(half: RxHalf) -> int | None:
    config: Any = getattr(getattr(half, "model", None), "config", None)
    text_config = getattr(config, "text_config", None) or config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_context(half: RxHalf, n_prompt: int, options: GenerationOptions) -> None:
    limit = context_length(half)
    if limit is not None and n_prompt + options.max_new_tokens > limit:
        raise BadRequestError(
            f"prompt is {n_prompt} tokens (image included) and max_new_tokens {options.max_new_tokens}; "
            f"together over the model's context of {limit} tokens: shorten the prompt"
        )
