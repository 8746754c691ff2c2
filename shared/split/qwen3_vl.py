"""Qwen3-VL split adapter (`Qwen3VLForConditionalGeneration`, and the MoE variant).

Qwen3-VL's vision encoder (``model.visual``) runs a stack of ViT blocks over the image
patches, then a patch merger (LayerNorm → concatenate each ``merge x merge`` group of
patches → MLP) into the language model's space. "DeepStack" adds more: the outputs of a
few intermediate blocks (``deepstack_visual_indexes``) each go through their own merger and
are *added* to the hidden states at the image positions after the first decoder layers.
So everything the language model needs from an image is the main features plus one
deepstack feature per level, and all of it crosses the wire:

- ``after_vision_tower``: the last block's output and the tapped blocks' outputs, all
  BEFORE their mergers, concatenated along the feature dim — ``[patches, (1 + L) x vision
  hidden]``; one row per patch (``merge²`` patches per language-model token, in the
  processor's merge-group order);
- ``after_projector``: the merger outputs (main, then each deepstack level) — ``[tokens,
  (1 + L) x text hidden]``; one row per language-model token.

``L`` is the number of deepstack levels. ``meta``: ``tokens_per_image`` (rows per image:
patches or tokens), ``image_grid_thw`` (flattened ``[t, h, w]`` patch grid per image: the
Rx needs it for the token count and the M-RoPE positions), ``deepstack_levels`` (the vision
block indexes of the concatenated deepstack parts, in order).

Tx (`Qwen3VLTxHalf`): the image processor and ``visual.*`` only (for ``after_vision_tower``
without the mergers). Rx (`Qwen3VLRxHalf`): the whole model minus the vision blocks (it keeps
the mergers for ``after_vision_tower``). It rebuilds the prompt without pixels (chat
template, each ``<|image_pad|>`` expanded to the grid's token count, ``mm_token_type_ids``)
and hands the features to `generate` as ``mm_encoder_outputs`` — the same object that
`generate` builds from ``pixel_values`` in the unsplit model — so the language model
receives them exactly as unsplit: main features scattered into the prompt embeddings,
deepstack features added after the first layers, positions from ``image_grid_thw``, and
(`generate` drops ``mm_encoder_outputs`` after the prefill) nothing re-injected while
decoding.

Token-id convention as in `shared.split.llava`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoProcessor,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
from transformers.utils import is_torchvision_available

from shared.errors import BadRequestError, ModelError
from shared.split import read_model_config
from shared.split.base import (
    CodecSupport,
    RxHalf,
    SplitPoint,
    TxHalf,
    VisionFeatures,
)
from shared.split.llava import (
    HfRxHalf,
    HfTxHalf,
    chat_text,
    checkpoint_key_files,
    load_hf_config,
    load_part,
    quiet_progress_bars,
    resolve_dtype,
    stop_token_ids,
)

log = logging.getLogger(__name__)

ARCHITECTURES = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")
_MODEL_CLASSES: dict[str, Any] = {
    "qwen3_vl": Qwen3VLForConditionalGeneration,
    "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
}

# Where the vision encoder lives in a saved checkpoint: transformers 5 names
# (``model.visual.``) and the original hub layout (``visual.``).
VISION_PREFIXES = ("model.visual.", "visual.")
# The mergers inside ``visual`` (relative names); the Tx skips them for after_vision_tower.
_MERGER_PREFIXES = ("merger.", "deepstack_merger_list.")

META_GRID = "image_grid_thw"
META_DEEPSTACK = "deepstack_levels"
META_TOKENS = "tokens_per_image"

_NO_TOKEN_REDUCTION = (
    "Qwen3-VL cannot take fewer visual tokens: the merger works on fixed groups of merge² patches, "
    "and the language model's M-RoPE positions and <|image_pad|> count come from each image's patch grid"
)


# --------------------------------------------------------------------------------------------
# Processor


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` without its video processor.

    transformers can build Qwen3-VL's video processor only with torchvision installed, and
    `Qwen3VLProcessor` requires one; for images the video processor is never used, so this
    class (same image processor, tokenizer and chat template) gives the same outputs.
    """

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any
    ):
        kwargs.pop("video_processor", None)  # a checkpoint's processor_config.json may describe one
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def load_processor(folder: Path) -> Any:
    """The checkpoint's processor: `AutoProcessor`, or `ImageOnlyQwen3VLProcessor` without torchvision."""
    try:
        if is_torchvision_available():
            return AutoProcessor.from_pretrained(folder)
        return ImageOnlyQwen3VLProcessor.from_pretrained(folder)
    except Exception as e:  # transformers raises many kinds
        raise ModelError(f"cannot load the processor of {folder}: {e}") from e


# --------------------------------------------------------------------------------------------
# Helpers


def _check_model_type(config: Any, folder: Path) -> str:
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in _MODEL_CLASSES:
        raise ModelError(f"{folder} is a {model_type!r} model, not Qwen3-VL ({', '.join(MODEL_TYPES)})")
    return model_type


def _deepstack_levels(config: Any) -> list[int]:
    return [int(i) for i in config.vision_config.deepstack_visual_indexes]


def _is_merger_key(key: str) -> bool:
    for prefix in VISION_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :].startswith(_MERGER_PREFIXES)
    return False


def split_levels(features: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """``[rows, (1 + levels) x dim]`` → main, then one ``[rows, dim]`` per deepstack level (contiguous)."""
    return [part.contiguous() for part in features.chunk(1 + levels, dim=-1)]


# --------------------------------------------------------------------------------------------
# The halves


class Qwen3VLTxHalf(HfTxHalf):
    """Image processor + vision encoder (+ its mergers for ``after_projector``); no language model."""

    def __init__(
        self,
        folder: Path,
        split_point: SplitPoint = SplitPoint.AFTER_VISION_TOWER,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.split_point = SplitPoint(split_point)
        self.device = torch.device(device)
        self.config = load_hf_config(self.folder)
        _check_model_type(self.config, self.folder)
        self.dtype = resolve_dtype(self.config, dtype)
        vision_config = self.config.vision_config
        self.deepstack_levels = _deepstack_levels(self.config)
        self.merge_size = int(vision_config.spatial_merge_size)

        key_files = checkpoint_key_files(self.folder)
        try:
            visual: nn.Module = AutoModel.from_config(vision_config)
        except Exception as e:
            raise ModelError(f"cannot build the vision encoder of {self.folder}: {e}") from e
        levels = len(self.deepstack_levels)
        if self.split_point is SplitPoint.AFTER_VISION_TOWER:
            # The Rx applies the mergers: the encoder then returns the blocks' own outputs.
            visual.merger = nn.Identity()
            visual.deepstack_merger_list = nn.ModuleList([nn.Identity() for _ in range(levels)])
            key_files = {k: f for k, f in key_files.items() if not _is_merger_key(k)}
            self.feature_dim = (1 + levels) * int(vision_config.hidden_size)
        else:
            self.feature_dim = (1 + levels) * int(vision_config.out_hidden_size)
        self.codec_support = CodecSupport(reason=_NO_TOKEN_REDUCTION)  # as the Rx half (no token reduction)
        load_part(visual, key_files, VISION_PREFIXES, "vision encoder", self.folder)
        self.visual = visual.to(device=self.device, dtype=self.dtype).eval()
        self.patch_dim = (
            int(vision_config.in_channels)
            * int(vision_config.temporal_patch_size)
            * int(vision_config.patch_size) ** 2
        )

        try:  # the image processor alone: the Tx needs no tokenizer
            self.image_processor: Any = AutoImageProcessor.from_pretrained(self.folder)
        except Exception:
            self.image_processor = load_processor(self.folder).image_processor

    def torch_modules(self) -> list[nn.Module]:
        """The torch modules this half holds."""
        return [self.visual]

    def encode(self, pixel_inputs: dict[str, torch.Tensor]) -> VisionFeatures:
        pixel_values = pixel_inputs.get("pixel_values")
        grid = pixel_inputs.get("image_grid_thw")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 2:
            raise BadRequestError("pixel_values must be a [patches, channels x time x patch²] tensor")
        if int(pixel_values.shape[1]) != self.patch_dim:
            raise BadRequestError(
                f"pixel_values rows must have {self.patch_dim} values, got {pixel_values.shape[1]}"
            )
        if (
            not isinstance(grid, torch.Tensor)
            or grid.dim() != 2
            or grid.shape[1] != 3
            or grid.shape[0] == 0
            or grid.is_floating_point()
        ):
            raise BadRequestError("image_grid_thw must be an [images, 3] integer tensor")
        patches = [int(p) for p in grid.prod(-1).tolist()]
        if sum(patches) != int(pixel_values.shape[0]) or any(p <= 0 for p in patches):
            raise BadRequestError(
                f"image_grid_thw {grid.tolist()} does not match the {int(pixel_values.shape[0])} patches"
            )
        with torch.inference_mode():
            out = self.visual(
                pixel_values.to(device=self.device, dtype=self.dtype),
                grid_thw=grid.to(self.device),
                return_dict=True,
            )
            features = torch.cat([out.pooler_output, *out.deepstack_features], dim=-1)
        merge = self.merge_size**2
        per_image = (
            patches if self.split_point is SplitPoint.AFTER_VISION_TOWER else [p // merge for p in patches]
        )
        return VisionFeatures(
            features=features.contiguous(),
            meta={
                META_TOKENS: per_image,
                META_GRID: [int(v) for v in grid.reshape(-1).tolist()],
                META_DEEPSTACK: list(self.deepstack_levels),
            },
        )


class Qwen3VLRxHalf(HfRxHalf):
    """(Mergers +) language model + generation; no vision blocks."""

    def __init__(
        self,
        folder: Path,
        split_point: SplitPoint = SplitPoint.AFTER_VISION_TOWER,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.split_point = SplitPoint(split_point)
        self.device = torch.device(device)
        raw = read_model_config(self.folder)
        model_type = str(raw.get("model_type") or "")
        model_class = _MODEL_CLASSES.get(model_type)
        if model_class is None:
            raise ModelError(
                f"{self.folder} is a {model_type!r} model, not Qwen3-VL ({', '.join(MODEL_TYPES)})"
            )
        self.processor = load_processor(self.folder)
        try:
            with quiet_progress_bars():
                model = model_class.from_pretrained(self.folder, dtype=dtype if dtype is not None else "auto")
        except Exception as e:
            raise ModelError(f"cannot load {self.folder}: {e}") from e
        model.to(self.device)
        self.model: Any = model.eval()
        self.dtype = next(self.model.parameters()).dtype
        config = self.model.config
        vision_config = config.vision_config
        self.deepstack_levels = _deepstack_levels(config)
        self.merge_size = int(vision_config.spatial_merge_size)
        text_hidden = int(config.text_config.hidden_size)
        if int(vision_config.out_hidden_size) != text_hidden:
            raise ModelError(
                f"{self.folder}: vision out_hidden_size {vision_config.out_hidden_size} != "
                f"text hidden size {text_hidden}"
            )
        if len(self.deepstack_levels) > int(config.text_config.num_hidden_layers):
            raise ModelError(f"{self.folder}: more deepstack levels than language-model layers")

        # The Tx runs the vision blocks (and the mergers, for after_projector): free them here.
        visual = self.model.model.visual
        self.merger: nn.Module | None = None
        self.deepstack_mergers: nn.ModuleList | None = None
        levels = len(self.deepstack_levels)
        if self.split_point is SplitPoint.AFTER_VISION_TOWER:
            self.merger = visual.merger
            self.deepstack_mergers = visual.deepstack_merger_list
            self.feature_dim = (1 + levels) * int(vision_config.hidden_size)
            self.codec_support = CodecSupport(
                reason=f"{_NO_TOKEN_REDUCTION}; no Linear to fold a codec into: each merger starts with a "
                "LayerNorm (and the features feed 1 + deepstack levels different mergers)",
            )
        else:
            self.feature_dim = (1 + levels) * text_hidden
            self.codec_support = CodecSupport(
                reason=f"{_NO_TOKEN_REDUCTION}; split after the mergers the features go straight into the "
                "language model's embeddings and hidden states (no Linear to fold a codec into)",
            )
        self.model.model.visual = None

        self.tokenizer = self.processor.tokenizer
        self.image_token = str(getattr(self.processor, "image_token", None) or "<|image_pad|>")
        self.video_token = str(getattr(self.processor, "video_token", None) or "<|video_pad|>")
        self.image_token_id = int(config.image_token_id)
        self.video_token_id = int(config.video_token_id)
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)

    # -- inputs --------------------------------------------------------------------------

    def lm_tokens(self, tokens: int) -> int:
        # Before the merger every merge² patches become one language-model token.
        if self.split_point is SplitPoint.AFTER_VISION_TOWER:
            return tokens // self.merge_size**2
        return tokens

    def _validate(self, prompt: str, features: VisionFeatures) -> list[list[int]]:
        """Checks ``features`` against this model; returns the ``[t, h, w]`` grid of each image."""
        if not isinstance(prompt, str):
            raise BadRequestError("prompt must be a string")
        for token in (self.image_token, self.video_token):
            if token in prompt:
                raise BadRequestError(f"prompt must not contain the placeholder {token!r}")
        x = features.features
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise BadRequestError(f"features must be a 2-D [tokens, dim] tensor, got shape {shape}")
        if not x.is_floating_point():
            raise BadRequestError(f"features must be floating point, got {x.dtype}")
        if int(x.shape[1]) != self.feature_dim:
            raise BadRequestError(
                f"feature dim {int(x.shape[1])} does not match this model's {self.split_point.value} "
                f"feature dim {self.feature_dim}"
            )
        meta = features.meta
        levels = [int(v) for v in meta[META_DEEPSTACK]] if META_DEEPSTACK in meta else None
        if levels != self.deepstack_levels:
            raise BadRequestError(
                f"{META_DEEPSTACK} {levels} does not match this model's deepstack levels "
                f"{self.deepstack_levels}"
            )
        flat = [int(v) for v in meta.get(META_GRID, [])]
        if not flat or len(flat) % 3:
            raise BadRequestError(f"{META_GRID} must be a non-empty list of [t, h, w] triples, got {flat}")
        grids = [flat[i : i + 3] for i in range(0, len(flat), 3)]
        for t, h, w in grids:
            if t <= 0 or h <= 0 or w <= 0 or h % self.merge_size or w % self.merge_size:
                raise BadRequestError(
                    f"{META_GRID} entry {[t, h, w]} is not a positive grid with h and w multiples of "
                    f"the merge size {self.merge_size}"
                )
        rows = self._rows_per_image(grids)
        if META_TOKENS in meta and [int(v) for v in meta[META_TOKENS]] != rows:
            raise BadRequestError(
                f"{META_TOKENS} {list(meta[META_TOKENS])} does not match {META_GRID} {grids} "
                f"(expected {rows} {'patches' if self._patch_rows else 'tokens'} per image)"
            )
        if sum(rows) != int(x.shape[0]):
            raise BadRequestError(
                f"features have {int(x.shape[0])} tokens but {META_GRID} {grids} needs {sum(rows)}"
            )
        return grids

    @property
    def _patch_rows(self) -> bool:
        return self.split_point is SplitPoint.AFTER_VISION_TOWER

    def _tokens_per_image(self, grids: Sequence[Sequence[int]]) -> list[int]:
        """Language-model tokens (``<|image_pad|>`` count) per image."""
        return [t * h * w // self.merge_size**2 for t, h, w in grids]

    def _rows_per_image(self, grids: Sequence[Sequence[int]]) -> list[int]:
        """Feature rows per image at this split point: patches, or language-model tokens."""
        return [t * h * w for t, h, w in grids] if self._patch_rows else self._tokens_per_image(grids)

    def prompt_text(self, prompt: str, tokens_per_image: Sequence[int]) -> str:
        """Chat template applied, each ``<|image_pad|>`` expanded to its image's token count."""
        text = chat_text(self.processor, prompt, len(tokens_per_image))
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(tokens_per_image):
            raise ModelError(
                f"the chat template of {self.folder} wrote {len(parts) - 1} image placeholders "
                f"for {len(tokens_per_image)} images"
            )
        pieces = [parts[0]]
        for n, part in zip(tokens_per_image, parts[1:], strict=True):
            pieces.append(self.image_token * n)
            pieces.append(part)
        return "".join(pieces)

    def image_encoder_outputs(self, features: torch.Tensor, tokens_per_image: Sequence[int]) -> Any:
        """``get_image_features``' output for the same images: merged main + deepstack features, per image."""
        levels = len(self.deepstack_levels)
        with torch.inference_mode():
            parts = split_levels(features.to(device=self.device, dtype=self.dtype), levels)
            if self.merger is not None and self.deepstack_mergers is not None:
                parts = [self.merger(parts[0])] + [
                    m(p) for m, p in zip(self.deepstack_mergers, parts[1:], strict=True)
                ]
        sizes = [int(n) for n in tokens_per_image]
        # Per-image tuples, as `get_image_features` stores them (the dataclass annotates tensors).
        pooler: Any = torch.split(parts[0], sizes)
        deepstack: Any = [torch.split(p, sizes) for p in parts[1:]]
        return BaseModelOutputWithDeepstackFeatures(pooler_output=pooler, deepstack_features=deepstack)

    def build_inputs(self, prompt: str, features: VisionFeatures) -> dict[str, Any]:
        grids = self._validate(prompt, features)
        tokens = self._tokens_per_image(grids)
        text = self.prompt_text(prompt, tokens)
        enc = self.tokenizer(text, return_tensors="pt")
        input_ids = enc["input_ids"].to(self.device)
        attention_mask = enc["attention_mask"].to(self.device)
        n_placeholders = int((input_ids == self.image_token_id).sum())
        if n_placeholders != sum(tokens):
            raise BadRequestError(
                f"the prompt holds {n_placeholders} image tokens after tokenization, expected {sum(tokens)}"
            )
        # As the processor: 1 for image tokens, 2 for video tokens, 0 for text.
        mm_token_type_ids = torch.zeros_like(input_ids)
        mm_token_type_ids[input_ids == self.image_token_id] = 1
        mm_token_type_ids[input_ids == self.video_token_id] = 2
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": mm_token_type_ids,
            "image_grid_thw": torch.tensor(grids, dtype=torch.long, device=self.device),
            "mm_encoder_outputs": {"image": self.image_encoder_outputs(features.features, tokens)},
        }


def load_tx_half(
    folder: Path, split_point: SplitPoint = SplitPoint.AFTER_VISION_TOWER, **kwargs: Any
) -> TxHalf:
    return Qwen3VLTxHalf(folder, split_point, **kwargs)


def load_rx_half(
    folder: Path, split_point: SplitPoint = SplitPoint.AFTER_VISION_TOWER, **kwargs: Any
) -> RxHalf:
    return Qwen3VLRxHalf(folder, split_point, **kwargs)
