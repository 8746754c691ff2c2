"""Qwen2-VL / Qwen2.5-VL split adapter (`Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`: vision blocks → patch merger → LM with M-RoPE).

Both families keep the connector inside the vision model: ``model.visual`` = patch embedding
→ vision blocks → ``merger`` (a norm, then an MLP over each 2x2 group of neighbouring
patches). The image processor cuts every image into ``t x h x w`` patches (``image_grid_thw``),
already ordered so that each 2x2 merge group is 4 consecutive rows.

Split points and the features on the wire (``[tokens, dim]``, images concatenated):

- ``after_vision_tower``: the output of the last vision block, the merger's input; one row per
  patch (``t*h*w`` per image) in the processor's patch order, ``dim`` = vision width. Qwen2.5-VL
  runs its blocks on patches permuted into attention windows; the Tx undoes that permutation,
  so the wire order is the same for both families and independent of the window size. The Rx
  applies the merger exactly as the model does (window order, then back).
- ``after_projector``: the merger's output, one row per merge group (``t*h*w / merge²`` per
  image), ``dim`` = text hidden size. Identical to ``model.get_image_features``.

``meta``: ``tokens_per_image`` (rows per image on the wire) and ``image_grid_thw`` (``t, h, w``
per image, flattened). The Rx needs the grids to rebuild the prompt (``<|image_pad|>`` is
expanded to ``t*h*w / merge²`` tokens per image) and the M-RoPE positions
(`get_rope_index` takes them from ``input_ids``, ``mm_token_type_ids`` and ``image_grid_thw``),
so it passes those to `generate` along with the embeddings: no pixel values are needed.

Token ids follow `shared.split.llava`'s convention (prompt excluded, cut at the first stop id).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoProcessor,
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
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

# The window order Qwen2.5-VL's vision model merges in (`transformers.vision_utils`, recent 5.x).
_get_vision_window_index: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None
try:
    from transformers.vision_utils import get_vision_window_index as _get_vision_window_index
except ImportError:  # pragma: no cover - older transformers 5 releases
    _get_vision_window_index = None

QWEN2_VL_ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
QWEN2_5_VL_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

# Where ``model.visual`` lives in a checkpoint: transformers 5 in-memory names first, then the
# original hub layout (``visual.``), which is also what transformers 5 writes on `save_pretrained`.
VISUAL_PREFIXES = ("model.visual.", "visual.")

CODEC_REASON_AFTER_VISION_TOWER = (
    "split before the Qwen patch merger: the merger concatenates fixed 2x2 groups of neighbouring "
    "patches and the prompt's image-token counts and M-RoPE positions come from image_grid_thw, so "
    "the Rx needs every patch of the grid (no token reduction); the merger starts with a norm "
    "(ln_q), not a Linear (no folding)"
)
CODEC_REASON_AFTER_PROJECTOR = (
    "split after the Qwen patch merger: each visual token's M-RoPE position (t, h, w) comes from "
    "image_grid_thw, so the Rx needs exactly t*h*w/merge² tokens per image (no token reduction); "
    "the language model's first op is a norm, not a Linear (no folding)"
)


@dataclass(frozen=True)
class _Family:
    model_type: str
    vision_cls: type[nn.Module]  # ``model.visual``: patch embedding, blocks, merger
    model_cls: type[Any]


_FAMILIES = {
    "qwen2_vl": _Family("qwen2_vl", Qwen2VisionTransformerPretrainedModel, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": _Family(
        "qwen2_5_vl", Qwen2_5_VisionTransformerPretrainedModel, Qwen2_5_VLForConditionalGeneration
    ),
}


def _family(config: Any, folder: Path) -> _Family:
    model_type = str(getattr(config, "model_type", ""))
    family = _FAMILIES.get(model_type)
    if family is None:
        raise ModelError(f"{folder} is a {model_type!r} checkpoint; this adapter handles {list(MODEL_TYPES)}")
    return family


def vision_width(config: Any) -> int:
    """Width of the vision blocks (the merger's input, the ``after_vision_tower`` dim)."""
    vision = config.vision_config
    if config.model_type == "qwen2_vl":
        return int(vision.embed_dim)
    return int(vision.hidden_size)


def merged_width(config: Any) -> int:
    """The merger's output width (the ``after_projector`` dim, the text hidden size)."""
    vision = config.vision_config
    if config.model_type == "qwen2_vl":
        return int(vision.hidden_size)
    return int(vision.out_hidden_size)


# --------------------------------------------------------------------------------------------
# The processor without torchvision


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without the video processor (which needs torchvision).

    `ProcessorMixin` reads the sub-processors from the ``__init__`` signature (image processor,
    tokenizer), so the ``None`` passed for the video processor is ignored.
    """

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any
    ) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video processor (see `ImageOnlyQwen2VLProcessor`)."""

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any
    ) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


_IMAGE_ONLY: dict[str, type[Any]] = {
    "qwen2_vl": ImageOnlyQwen2VLProcessor,
    "qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor,
}


def load_processor(folder: Path) -> Any:
    """The checkpoint's processor: `AutoProcessor`, or (without torchvision, which the Qwen video
    processor needs) the same processor class without its video processor; images need none."""
    folder = Path(folder)
    try:
        if is_torchvision_available():
            return AutoProcessor.from_pretrained(folder)
        model_type = str(read_model_config(folder).get("model_type") or "")
        cls = _IMAGE_ONLY.get(model_type)
        if cls is None:
            raise ModelError(f"{folder} is a {model_type!r} model, not one of {list(MODEL_TYPES)}")
        return cls.from_pretrained(folder)
    except ModelError:
        raise
    except Exception as e:  # transformers raises many kinds
        raise ModelError(f"cannot load the processor of {folder}: {e}") from e


# --------------------------------------------------------------------------------------------
# Grid metadata


def grids_from_meta(meta: dict[str, list[int]]) -> list[tuple[int, int, int]]:
    """``meta["image_grid_thw"]`` as ``(t, h, w)`` per image; BadRequestError when malformed."""
    flat = meta.get("image_grid_thw")
    if flat is None:
        raise BadRequestError("features lack the image_grid_thw metadata (t, h, w per image)")
    try:
        values = [int(v) for v in flat]
    except (TypeError, ValueError):
        raise BadRequestError("image_grid_thw must be a list of integers") from None
    if not values or len(values) % 3:
        raise BadRequestError(
            f"image_grid_thw must hold 3 integers (t, h, w) per image, got {len(values)} values"
        )
    grids = [(values[i], values[i + 1], values[i + 2]) for i in range(0, len(values), 3)]
    if any(v <= 0 for g in grids for v in g):
        raise BadRequestError(f"image_grid_thw values must be positive, got {values}")
    return grids


def _check_grids(grids: Sequence[tuple[int, int, int]], merge: int) -> None:
    for t, h, w in grids:
        if h % merge or w % merge:
            raise BadRequestError(
                f"image grid (t={t}, h={h}, w={w}) is not a multiple of the spatial merge size {merge}"
            )


# --------------------------------------------------------------------------------------------
# The halves


class _GroupPatches(nn.Module):
    """Stands in for the merger on the Tx (split before it): concatenates each merge group, no weights.

    The vision model applies its merger to the window-ordered block outputs and then puts the
    merged rows back in the processor's order; with this in the merger's place the same code
    returns the block outputs in the processor's order, 4 patches per row.
    """

    def __init__(self, unit: int) -> None:
        super().__init__()
        self.unit = unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.unit * x.shape[-1])


class QwenVLTxHalf(HfTxHalf):
    """Image processor + vision blocks (+ the patch merger for ``after_projector``); no language model."""

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
        self.family = _family(self.config, self.folder)
        self.dtype = resolve_dtype(self.config, dtype)
        self.merge_size = int(self.config.vision_config.spatial_merge_size)

        key_files = checkpoint_key_files(self.folder)
        try:
            visual: Any = self.family.vision_cls._from_config(self.config.vision_config)  # type: ignore[attr-defined]
        except Exception as e:
            raise ModelError(f"cannot build the vision encoder of {self.folder}: {e}") from e
        parts = ["patch_embed", "blocks"]
        if self.split_point is SplitPoint.AFTER_PROJECTOR:
            parts.append("merger")
            self.feature_dim = merged_width(self.config)
            self.codec_support = CodecSupport(reason=CODEC_REASON_AFTER_PROJECTOR)
        else:
            visual.merger = _GroupPatches(self.merge_size**2)
            self.feature_dim = vision_width(self.config)
            self.codec_support = CodecSupport(reason=CODEC_REASON_AFTER_VISION_TOWER)
        for part in parts:  # only these tensors are read (no merger before it, no language model)
            prefixes = [p + part + "." for p in VISUAL_PREFIXES]
            load_part(getattr(visual, part), key_files, prefixes, f"vision {part}", self.folder)
        self.visual: nn.Module = visual.to(device=self.device, dtype=self.dtype).eval()

        try:  # the image processor alone: the Tx needs no tokenizer
            self.image_processor: Any = AutoImageProcessor.from_pretrained(self.folder)
        except Exception:
            try:
                processor = load_processor(self.folder)
            except Exception as e:
                raise ModelError(f"cannot load the image processor of {self.folder}: {e}") from e
            self.image_processor = processor.image_processor

    def torch_modules(self) -> list[nn.Module]:
        """The torch modules this half holds."""
        return [self.visual]

    def encode(self, pixel_inputs: dict[str, torch.Tensor]) -> VisionFeatures:
        pixel_values = pixel_inputs.get("pixel_values")
        grid_thw = pixel_inputs.get("image_grid_thw")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 2:
            raise BadRequestError("pixel_values must be a [patches, channels*t*p*p] tensor")
        if not isinstance(grid_thw, torch.Tensor) or grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            raise BadRequestError("image_grid_thw must be an [images, 3] tensor")
        grids = grids_from_meta({"image_grid_thw": grid_thw.reshape(-1).tolist()})
        _check_grids(grids, self.merge_size)
        patches = [t * h * w for t, h, w in grids]
        if sum(patches) != int(pixel_values.shape[0]):
            raise BadRequestError(
                f"pixel_values has {int(pixel_values.shape[0])} patches, "
                f"image_grid_thw describes {sum(patches)}"
            )
        with torch.inference_mode():
            pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
            out = self.visual(pixel_values, grid_thw=grid_thw.to(self.device))
            features = out if isinstance(out, torch.Tensor) else out.pooler_output
            if self.split_point is SplitPoint.AFTER_VISION_TOWER:
                features = features.reshape(-1, self.feature_dim)
                tokens = patches
            else:
                tokens = [n // self.merge_size**2 for n in patches]
        return VisionFeatures(
            features=features.contiguous(),
            meta={
                "tokens_per_image": [int(n) for n in tokens],
                "image_grid_thw": [int(v) for g in grids for v in g],
            },
        )


class QwenVLRxHalf(HfRxHalf):
    """(Patch merger +) language model with M-RoPE + generation; no vision blocks."""

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
        read_model_config(self.folder)
        try:
            config = AutoConfig.from_pretrained(self.folder)
            self.family = _family(config, self.folder)
            self.processor = load_processor(self.folder)
            with quiet_progress_bars():
                model = self.family.model_cls.from_pretrained(
                    self.folder, dtype=dtype if dtype is not None else "auto"
                )
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"cannot load {self.folder}: {e}") from e
        model.to(self.device)
        self.model: Any = model.eval()
        self.dtype = next(self.model.parameters()).dtype
        config = self.model.config
        vision = config.vision_config
        self.merge_size = int(vision.spatial_merge_size)
        # Qwen2.5-VL merges in attention-window order (see `_merge`).
        self.window: tuple[int, int] | None = None
        if self.family.model_type == "qwen2_5_vl":
            self.window = (int(vision.window_size), int(vision.patch_size))
        # The Tx runs the vision blocks (and the merger, for after_projector): free them here.
        self.merger: nn.Module | None = self.model.model.visual.merger
        self.model.model.visual = None
        if self.split_point is SplitPoint.AFTER_PROJECTOR:
            self.merger = None
            self.feature_dim = merged_width(config)
            self.codec_support = CodecSupport(reason=CODEC_REASON_AFTER_PROJECTOR)
        else:
            self.feature_dim = vision_width(config)
            self.codec_support = CodecSupport(reason=CODEC_REASON_AFTER_VISION_TOWER)

        self.tokenizer = self.processor.tokenizer
        self.image_token = str(getattr(self.processor, "image_token", None) or "<|image_pad|>")
        self.video_token = str(getattr(self.processor, "video_token", None) or "<|video_pad|>")
        self.image_token_id = int(config.image_token_id)
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)

    # -- inputs --------------------------------------------------------------------------

    def lm_tokens(self, tokens: int) -> int:
        # Before the merger every merge² patches become one language-model token.
        if self.split_point is SplitPoint.AFTER_VISION_TOWER:
            return tokens // self.merge_size**2
        return tokens

    def _validate(self, prompt: str, features: VisionFeatures) -> list[tuple[int, int, int]]:
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
        grids = grids_from_meta(features.meta)
        _check_grids(grids, self.merge_size)
        per_row = 1 if self.split_point is SplitPoint.AFTER_VISION_TOWER else self.merge_size**2
        expected = [t * h * w // per_row for t, h, w in grids]
        if "tokens_per_image" in features.meta:
            tpi = [int(t) for t in features.meta["tokens_per_image"]]
            if tpi != expected:
                raise BadRequestError(
                    f"tokens_per_image {tpi} does not match image_grid_thw {[list(g) for g in grids]}, "
                    f"which gives {expected} {self.split_point.value} tokens per image"
                )
        if sum(expected) != int(x.shape[0]):
            raise BadRequestError(
                f"features have {int(x.shape[0])} tokens but image_grid_thw {[list(g) for g in grids]} "
                f"gives {sum(expected)} {self.split_point.value} tokens"
            )
        return grids

    def prompt_text(self, prompt: str, grids: Sequence[tuple[int, int, int]]) -> str:
        """Chat template applied, each ``<|image_pad|>`` expanded to ``t*h*w / merge²`` tokens."""
        text = chat_text(self.processor, prompt, len(grids))
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(grids):
            raise ModelError(
                f"the chat template of {self.folder} wrote {len(parts) - 1} image placeholders "
                f"for {len(grids)} images"
            )
        pieces = [parts[0]]
        for (t, h, w), part in zip(grids, parts[1:], strict=True):
            pieces.append(self.image_token * (t * h * w // self.merge_size**2))
            pieces.append(part)
        return "".join(pieces)

    def _merge(self, x: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """The merger on wire-order (processor-order) block outputs, as the vision model applies it.

        The merger maps each group of ``merge²`` consecutive rows on its own, so any group order
        gives the same tokens; Qwen2.5-VL's vision model merges in attention-window order and
        then restores the processor order, and so does this, to match it bit for bit.
        """
        assert self.merger is not None
        if self.window is None or _get_vision_window_index is None:
            return self.merger(x)
        unit = self.merge_size**2
        window_size, patch_size = self.window
        grid_thw = torch.tensor(grids, dtype=torch.long)
        window_index, _ = _get_vision_window_index(grid_thw, self.merge_size, window_size, patch_size)
        window_index = window_index.to(x.device)
        windowed = x.reshape(-1, unit, x.shape[-1])[window_index].reshape(-1, x.shape[-1])
        return self.merger(windowed)[torch.argsort(window_index)]

    def build_inputs(self, prompt: str, features: VisionFeatures) -> dict[str, Any]:
        grids = self._validate(prompt, features)
        text = self.prompt_text(prompt, grids)
        enc = self.tokenizer(text, return_tensors="pt")
        input_ids = enc["input_ids"].to(self.device)
        attention_mask = enc["attention_mask"].to(self.device)
        image_mask = input_ids == self.image_token_id
        n_expected = sum(t * h * w for t, h, w in grids) // self.merge_size**2
        if int(image_mask.sum()) != n_expected:
            raise BadRequestError(
                f"the prompt holds {int(image_mask.sum())} image tokens after tokenization, "
                f"expected {n_expected}"
            )
        with torch.inference_mode():
            embeds = self.model.get_input_embeddings()(input_ids)
            image_embeds = features.features.to(device=self.device, dtype=self.dtype)
            if self.merger is not None:
                image_embeds = self._merge(image_embeds, grids)
            image_embeds = image_embeds.to(embeds.dtype)
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1).expand_as(embeds), image_embeds)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "inputs_embeds": embeds,
            # What `get_rope_index` needs for the M-RoPE positions: 1 marks image tokens.
            "mm_token_type_ids": image_mask.to(input_ids.dtype),
            "image_grid_thw": torch.tensor(grids, dtype=torch.long, device=self.device),
        }


def load_tx_half(
    folder: Path, split_point: SplitPoint = SplitPoint.AFTER_VISION_TOWER, **kwargs: Any
) -> TxHalf:
    return QwenVLTxHalf(folder, split_point, **kwargs)


def load_rx_half(
    folder: Path, split_point: SplitPoint = SplitPoint.AFTER_VISION_TOWER, **kwargs: Any
) -> RxHalf:
    return QwenVLRxHalf(folder, split_point, **kwargs)
