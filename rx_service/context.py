"""How many tokens a prompt costs the language model: `usage.prompt_tokens` of the OpenAI APIs.

    prompt + visual tokens ─► chat template ─► tokenizer ─► n prompt tokens

(Whether it fits the model's context is checked before the payload is read:
`rx_service.limits.check_token_budget`.)
"""

from __future__ import annotations

from typing import Any

from shared.split import RxHalf, VisionFeatures


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
