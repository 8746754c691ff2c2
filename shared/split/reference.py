"""The unsplit Hugging Face path: the baseline that split generation must reproduce.

`unsplit_generate` runs the checkpoint exactly as its model card would —
`AutoProcessor` on the images and the chat text, then the full model's `generate` —
and returns the new token ids under the same convention as `RxHalf.generate`
(prompt excluded, cut at the first EOS/pad, which is excluded).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from shared.errors import ModelError
from shared.split import adapter_for, read_model_config
from shared.split.base import GenerationOptions
from shared.split.llava import (
    chat_text,
    generation_kwargs,
    quiet_progress_bars,
    seeded,
    stop_token_ids,
    truncate_at_stop,
)


def _processor_loader(folder: Path) -> Callable[[Path], Any]:
    """`AutoProcessor.from_pretrained`, or the split adapter's ``load_processor`` where it has one.

    (The Qwen-VL adapters have one: without torchvision, transformers cannot build those
    families' video processors, and so no `AutoProcessor`; images need none.)
    """
    try:
        module = importlib.import_module(adapter_for(folder).module)
    except ModelError:
        return cast(Callable[[Path], Any], AutoProcessor.from_pretrained)
    return cast(Callable[[Path], Any], getattr(module, "load_processor", AutoProcessor.from_pretrained))


def load_unsplit(
    folder: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> tuple[Any, Any]:
    """(processor, model) for the whole checkpoint, in eval mode."""
    config = read_model_config(Path(folder))
    architectures = config.get("architectures") or []
    cls: Any = (
        LlavaForConditionalGeneration
        if "LlavaForConditionalGeneration" in architectures
        else AutoModelForImageTextToText
    )
    try:
        processor = _processor_loader(Path(folder))(folder)
        with quiet_progress_bars():
            model = cls.from_pretrained(folder, dtype=dtype if dtype is not None else "auto")
    except Exception as e:  # transformers raises many kinds
        raise ModelError(f"cannot load {folder}: {e}") from e
    return processor, model.to(torch.device(device)).eval()


def unsplit_inputs(processor: Any, images: list[Image.Image], prompt: str) -> dict[str, torch.Tensor]:
    """What the processor gives the full model for ``images`` + ``prompt`` (input_ids, pixel_values, ...)."""
    text = chat_text(processor, prompt, len(images))
    return dict(processor(images=list(images), text=text, return_tensors="pt"))


def unsplit_generate(
    folder: Path,
    images: list[Image.Image],
    prompt: str,
    options: GenerationOptions,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> list[int]:
    """Generate with the unsplit model; returns the new token ids (see module docstring)."""
    processor, model = load_unsplit(folder, device=device, dtype=dtype)
    dev = torch.device(device)
    inputs = {
        k: v.to(dev, model.dtype) if v.is_floating_point() else v.to(dev)
        for k, v in unsplit_inputs(processor, images, prompt).items()
    }
    prompt_len = int(inputs["input_ids"].shape[1])
    with torch.inference_mode(), seeded(options, dev):
        out = model.generate(**inputs, **generation_kwargs(options))
    return truncate_at_stop(out[0, prompt_len:].tolist(), stop_token_ids(model, processor.tokenizer))
