"""Idefics3 / SmolVLM split adapter (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`).

The image processor cuts each image into ``rows x cols`` square tiles plus one downscaled
global tile (or a single tile when it does not split: ``rows = cols = 0``); the vision
transformer encodes each tile into a ``side x side`` grid of patch tokens; the connector
pixel-shuffles every ``scale x scale`` block of patches into one token and projects it
(`Linear`) to the text hidden size, giving ``image_seq_len`` tokens per tile; the processor
writes ``<fake_token_around_image><row_i_col_j>`` + ``image_seq_len`` ``<image>`` tokens per
tile and ``<global-img>`` before the global tile's.

Tx (`Idefics3TxHalf`) holds the image processor, the vision transformer and — when split
after it — the connector, read alone from the checkpoint's safetensors. Rx
(`Idefics3RxHalf`) holds the language model (and the connector when split before it) and
rebuilds the prompt from ``rows``/``cols`` with the processor's own expansion
(`Idefics3Processor.replace_image_token`), without pixels.

Split points and the features on the wire (``[tokens, dim]``, tiles and images in prompt
order):

- ``after_vision_tower``: the vision transformer's last hidden state (post-layernorm) of
  every tile, ``side²`` tokens per tile, ``dim = vision hidden size``;
- ``after_projector``: the connector output, ``image_seq_len`` tokens per tile,
  ``dim = text hidden size``.

Metadata (one value per image): ``tokens_per_image``, ``image_rows``, ``image_cols``,
``tiles_per_image`` (``rows * cols + 1``, or 1 when not split) and ``tokens_per_tile``.

Both reproduce `Idefics3Model.get_image_features` exactly, so split generation gives the
same token ids as the unsplit model (`shared.split.reference`); token-id convention as in
`shared.split.llava`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoProcessor,
    Idefics3ForConditionalGeneration,
    SmolVLMForConditionalGeneration,
)
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector, Idefics3VisionTransformer
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector, SmolVLMVisionTransformer

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
    load_part,
    quiet_progress_bars,
    resolve_dtype,
    stop_token_ids,
)

ARCHITECTURES = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
MODEL_TYPES = ("idefics3", "smolvlm")

# model_type → (vision transformer, connector, full model) classes.
_CLASSES: dict[str, tuple[Any, Any, Any]] = {
    "idefics3": (Idefics3VisionTransformer, Idefics3Connector, Idefics3ForConditionalGeneration),
    "smolvlm": (SmolVLMVisionTransformer, SmolVLMConnector, SmolVLMForConditionalGeneration),
}

# Where each part lives in a checkpoint: `…ForConditionalGeneration` (hub checkpoints and what
# transformers 5 `save_pretrained` writes: no conversion mapping for these families) and a bare
# `Idefics3Model` / `SmolVLMModel`.
VISION_PREFIXES = ("model.vision_model.", "vision_model.")
CONNECTOR_PREFIXES = ("model.connector.", "connector.")

_WHY_NO_TOKEN_REDUCTION_VT = (
    "after_vision_tower: the connector pixel-shuffles each tile's full {side}x{side} patch grid "
    "({scale}x{scale} blocks into one token), so every patch of every tile must arrive"
)
_WHY_NO_FOLD_VT = (
    "; no linear folding: the connector's Linear acts on {scale}x{scale} concatenated (pixel-shuffled) "
    "patches, not on each token"
)
_WHY_AP = (
    "after_projector: the prompt gives every tile exactly image_seq_len={seq} <image> tokens between its "
    "<row_i_col_j>/<global-img> markers, so the token count is fixed; the language model's first op is "
    "a norm, not a Linear"
)


@dataclass(frozen=True)
class _Geometry:
    """What fixes the token layout, from the model config."""

    side: int  # patches per tile side
    scale: int  # pixel-shuffle factor
    vision_dim: int
    text_dim: int

    @property
    def patches_per_tile(self) -> int:
        return self.side * self.side

    @property
    def image_seq_len(self) -> int:
        return self.patches_per_tile // (self.scale * self.scale)


def _model_type(config: Any, folder: Path) -> str:
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in _CLASSES:
        raise ModelError(f"{folder} is a {model_type!r} checkpoint, not idefics3/smolvlm")
    return model_type


def _geometry(config: Any, folder: Path) -> _Geometry:
    vision = config.vision_config
    image_size, patch_size, scale = int(vision.image_size), int(vision.patch_size), int(config.scale_factor)
    side = image_size // patch_size
    if side <= 0 or image_size % patch_size or scale <= 0 or side % scale:
        raise ModelError(
            f"{folder}: vision image_size {image_size} / patch_size {patch_size} / scale_factor {scale} "
            "do not give a square patch grid divisible by the scale factor"
        )
    return _Geometry(side, scale, int(vision.hidden_size), int(config.text_config.hidden_size))


def _load_config(folder: Path) -> Any:
    read_model_config(folder)
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:  # transformers raises many kinds
        raise ModelError(f"cannot load the config of {folder}: {e}") from e


def _load_module(
    factory: Any,
    key_files: dict[str, Path],
    prefixes: Sequence[str],
    part: str,
    folder: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """Build ``factory()`` on the meta device (no random init, no memory) and adopt its checkpoint tensors.

    `load_part` (key prefixes, missing/unexpected tensors) with ``assign=True``: safetensors
    tensors are memory-mapped, so a checkpoint already in ``dtype`` is used in place, never
    copied, and only this part's pages of the file are ever read.
    """
    try:
        with torch.device("meta"):
            module: nn.Module = factory()
    except Exception as e:  # transformers raises many kinds
        raise ModelError(f"cannot build the {part} of {folder}: {e}") from e
    # load_part calls `module.load_state_dict(state, strict=True)`: make that assign for this call.
    module.load_state_dict = functools.partial(nn.Module.load_state_dict, module, assign=True)  # type: ignore[method-assign]
    try:
        load_part(module, key_files, prefixes, part, folder)
    finally:
        del module.load_state_dict
    module.to(device=device, dtype=dtype)
    on_meta = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if on_meta:  # a non-persistent buffer the checkpoint cannot hold
        raise ModelError(f"the {part} of {folder} has tensors no checkpoint provides: {', '.join(on_meta)}")
    return module.eval()


def _ints(value: Any, what: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, (list, tuple)):
        out: list[int] = []
        for v in value:
            out.extend(_ints(v, what) if isinstance(v, (list, tuple, torch.Tensor)) else [int(v)])
        return out
    raise BadRequestError(f"{what} must be a list of ints")


def tiles_for(rows: int, cols: int) -> int:
    """Tiles the processor makes for an image split into ``rows x cols``: those + the global tile."""
    return rows * cols + 1 if rows or cols else 1


# --------------------------------------------------------------------------------------------
# The halves


class Idefics3TxHalf(HfTxHalf):
    """Image processor + vision transformer (+ connector for ``after_projector``); no language model."""

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
        self.config = _load_config(self.folder)
        model_type = _model_type(self.config, self.folder)
        self.geometry = _geometry(self.config, self.folder)
        self.dtype = resolve_dtype(self.config, dtype)
        vision_cls, connector_cls, _ = _CLASSES[model_type]

        key_files = checkpoint_key_files(self.folder)
        self.vision_model: nn.Module = _load_module(
            lambda: vision_cls._from_config(self.config.vision_config),
            key_files,
            VISION_PREFIXES,
            "vision model",
            self.folder,
            dtype=self.dtype,
            device=self.device,
        )
        self.connector: nn.Module | None = None
        if self.split_point is SplitPoint.AFTER_PROJECTOR:
            self.connector = _load_module(
                lambda: connector_cls(self.config),
                key_files,
                CONNECTOR_PREFIXES,
                "connector",
                self.folder,
                dtype=self.dtype,
                device=self.device,
            )
            self.feature_dim = self.geometry.text_dim
            self.tokens_per_tile = self.geometry.image_seq_len
            self.codec_support = CodecSupport(reason=_WHY_AP.format(seq=self.geometry.image_seq_len))
        else:
            self.feature_dim = self.geometry.vision_dim
            self.tokens_per_tile = self.geometry.patches_per_tile
            self.codec_support = CodecSupport(
                reason=_WHY_NO_TOKEN_REDUCTION_VT.format(side=self.geometry.side, scale=self.geometry.scale)
                + _WHY_NO_FOLD_VT.format(scale=self.geometry.scale)
            )

        try:  # the image processor alone: the Tx needs no tokenizer
            self.image_processor: Any = AutoImageProcessor.from_pretrained(self.folder)
        except Exception:
            try:
                processor = AutoProcessor.from_pretrained(self.folder)
            except Exception as e:
                raise ModelError(f"cannot load the image processor of {self.folder}: {e}") from e
            self.image_processor = getattr(processor, "image_processor", None) or processor

    def torch_modules(self) -> list[nn.Module]:
        """The torch modules this half holds."""
        return [m for m in (self.vision_model, self.connector) if m is not None]

    def preprocess(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """pixel_values ``[1, tiles, 3, H, W]``, pixel_attention_mask, and each image's split grid."""
        if not images:
            raise BadRequestError("at least one image is required")
        # One sample holding every image, as the processor does for one prompt.
        out = self.image_processor(images=[list(images)], return_tensors="pt", return_row_col_info=True)
        inputs = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        inputs["image_rows"] = torch.tensor(_ints(out["rows"], "rows"), dtype=torch.long)
        inputs["image_cols"] = torch.tensor(_ints(out["cols"], "cols"), dtype=torch.long)
        return inputs

    def encode(self, pixel_inputs: dict[str, torch.Tensor]) -> VisionFeatures:
        pixel_values = pixel_inputs.get("pixel_values")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() not in (4, 5):
            raise BadRequestError("pixel_values must be a [tiles, 3, H, W] or [1, tiles, 3, H, W] tensor")
        if "image_rows" not in pixel_inputs or "image_cols" not in pixel_inputs:
            raise BadRequestError("image_rows / image_cols (from preprocess) are required")
        rows = _ints(pixel_inputs["image_rows"], "image_rows")
        cols = _ints(pixel_inputs["image_cols"], "image_cols")
        if len(rows) != len(cols) or not rows:
            raise BadRequestError(f"image_rows {rows} and image_cols {cols} must be equally long, non-empty")
        tiles = [tiles_for(r, c) for r, c in zip(rows, cols, strict=True)]
        pixel_values = pixel_values.reshape(-1, *pixel_values.shape[-3:])
        if int(pixel_values.shape[0]) != sum(tiles):
            raise BadRequestError(
                f"pixel_values hold {int(pixel_values.shape[0])} tiles, the split grids {rows}x{cols} "
                f"give {sum(tiles)}"
            )
        mask = pixel_inputs.get("pixel_attention_mask")
        if mask is None:
            mask = torch.ones(
                (pixel_values.shape[0], *pixel_values.shape[-2:]),
                dtype=torch.bool,
                device=pixel_values.device,
            )
        mask = mask.reshape(-1, *mask.shape[-2:])
        patch = int(self.config.vision_config.patch_size)
        with torch.inference_mode():
            # As `Idefics3Model.get_image_features` (one sample: no padding tiles to drop).
            pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
            subgrid = mask.to(self.device).unfold(1, patch, patch).unfold(2, patch, patch)
            patch_attention_mask = (subgrid.sum(dim=(-1, -2)) > 0).bool()
            hidden = self.vision_model(
                pixel_values=pixel_values, patch_attention_mask=patch_attention_mask, return_dict=True
            ).last_hidden_state
            if self.connector is not None:
                hidden = self.connector(hidden)
        n_tiles, per_tile, dim = hidden.shape
        if per_tile != self.tokens_per_tile:
            raise BadRequestError(
                f"the tiles gave {per_tile} tokens each, this model expects {self.tokens_per_tile} "
                "(tiles must be the vision model's image_size)"
            )
        return VisionFeatures(
            features=hidden.reshape(n_tiles * per_tile, dim).contiguous(),
            meta={
                "tokens_per_image": [t * per_tile for t in tiles],
                "image_rows": rows,
                "image_cols": cols,
                "tiles_per_image": tiles,
                "tokens_per_tile": [per_tile] * len(tiles),
            },
        )


class Idefics3RxHalf(HfRxHalf):
    """(Connector +) language model + generation; no vision model."""

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
        config = _load_config(self.folder)
        model_cls = _CLASSES[_model_type(config, self.folder)][2]
        self.geometry = _geometry(config, self.folder)
        try:
            self.processor = AutoProcessor.from_pretrained(self.folder)
            with quiet_progress_bars():
                model = model_cls.from_pretrained(self.folder, dtype=dtype if dtype is not None else "auto")
        except Exception as e:
            raise ModelError(f"cannot load {self.folder}: {e}") from e
        model.to(self.device)
        self.model: Any = model.eval()
        self.dtype = next(self.model.parameters()).dtype
        if not callable(getattr(self.processor, "replace_image_token", None)):
            raise ModelError(f"the processor of {self.folder} has no replace_image_token (transformers < 5?)")
        self.image_seq_len = self.geometry.image_seq_len
        processor_seq_len = int(getattr(self.processor, "image_seq_len", self.image_seq_len))
        if processor_seq_len != self.image_seq_len:
            raise ModelError(
                f"{self.folder}: the processor's image_seq_len {processor_seq_len} does not match the "
                f"model's {self.image_seq_len} ((image_size / patch_size)² / scale_factor²)"
            )
        self.max_grid = self._max_grid()

        # The Tx runs the vision model (and the connector, for after_projector): free them here.
        self.model.model.vision_model = None
        self.connector: nn.Module | None = self.model.model.connector
        g = self.geometry
        if self.split_point is SplitPoint.AFTER_PROJECTOR:
            self.model.model.connector = None
            self.connector = None
            self.feature_dim = g.text_dim
            self.tokens_per_tile = g.image_seq_len
            self.codec_support = CodecSupport(reason=_WHY_AP.format(seq=g.image_seq_len))
        else:
            self.feature_dim = g.vision_dim
            self.tokens_per_tile = g.patches_per_tile
            self.codec_support = CodecSupport(
                reason=_WHY_NO_TOKEN_REDUCTION_VT.format(side=g.side, scale=g.scale)
                + _WHY_NO_FOLD_VT.format(scale=g.scale)
            )

        self.tokenizer = self.processor.tokenizer
        self.image_token = str(getattr(self.processor, "image_token", None) or "<image>")
        self.image_token_id = int(config.image_token_id)
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)

    def lm_tokens(self, tokens: int) -> int:
        # Every tile reaches the language model as image_seq_len tokens, whatever crosses the wire.
        return tokens // self.tokens_per_tile * self.image_seq_len

    def _max_grid(self) -> int:
        """The most tiles per side the image processor can make (bounds ``rows``/``cols`` from the wire)."""
        image_processor = getattr(self.processor, "image_processor", None)

        def edge(value: Any) -> int | None:
            if isinstance(value, dict):
                value = value.get("longest_edge")
            else:
                value = getattr(value, "longest_edge", None)
            return int(value) if isinstance(value, (int, float)) and value > 0 else None

        longest = edge(getattr(image_processor, "size", None))
        tile = edge(getattr(image_processor, "max_image_size", None))
        if longest is None or tile is None:
            return 64
        # Images are first resized to at most 4096 px on a side (the processor's MAX_IMAGE_SIZE).
        return max(1, math.ceil(min(longest, 4096) / tile))

    # -- inputs --------------------------------------------------------------------------

    def _validate(self, prompt: str, features: VisionFeatures) -> tuple[list[int], list[int], list[int]]:
        """(rows, cols, tiles) per image, after checking the features against the metadata."""
        if not isinstance(prompt, str):
            raise BadRequestError("prompt must be a string")
        if self.image_token in prompt:
            raise BadRequestError(f"prompt must not contain the image placeholder {self.image_token!r}")
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
        absent = [k for k in ("image_rows", "image_cols") if k not in meta]
        if absent:
            raise BadRequestError(
                f"feature metadata lacks {', '.join(absent)} (needed to rebuild the prompt)"
            )
        rows, cols = [int(v) for v in meta["image_rows"]], [int(v) for v in meta["image_cols"]]
        n = len(rows)
        if n == 0 or len(cols) != n:
            raise BadRequestError(f"image_rows {rows} and image_cols {cols} must be equally long, non-empty")
        for r, c in zip(rows, cols, strict=True):
            if (r == 0) != (c == 0) or not (0 <= r <= self.max_grid and 0 <= c <= self.max_grid):
                raise BadRequestError(
                    f"image split grid {r}x{c} is not one the image processor makes "
                    f"(both 0, or 1..{self.max_grid} each)"
                )
        tiles = [tiles_for(r, c) for r, c in zip(rows, cols, strict=True)]
        expected = {
            "tiles_per_image": tiles,
            "tokens_per_tile": [self.tokens_per_tile] * n,
            "tokens_per_image": [t * self.tokens_per_tile for t in tiles],
        }
        for key, want in expected.items():
            got = [int(v) for v in meta.get(key, want)]
            if got != want:
                raise BadRequestError(
                    f"{key} {got} does not match the split grids {rows}x{cols} "
                    f"({self.tokens_per_tile} {self.split_point.value} tokens per tile): expected {want}"
                )
        total = sum(expected["tokens_per_image"])
        if int(x.shape[0]) != total:
            raise BadRequestError(
                f"features have {int(x.shape[0])} tokens but the metadata ({sum(tiles)} tiles x "
                f"{self.tokens_per_tile} tokens per tile) says {total}"
            )
        return rows, cols, tiles

    def prompt_text(self, prompt: str, rows: Sequence[int], cols: Sequence[int]) -> str:
        """Chat template applied, each image placeholder expanded by the processor for its split grid."""
        text = chat_text(self.processor, prompt, len(rows))
        found = text.count(self.image_token)
        if found != len(rows):
            raise ModelError(
                f"the chat template of {self.folder} wrote {found} image placeholders for {len(rows)} images"
            )
        grid = {"rows": [list(rows)], "cols": [list(cols)]}
        replacements = [self.processor.replace_image_token(grid, image_idx=i) for i in range(len(rows))]
        texts, _ = self.processor.get_text_with_replacements([text], images_replacements=replacements)
        return str(texts[0])

    def build_inputs(self, prompt: str, features: VisionFeatures) -> dict[str, Any]:
        rows, cols, tiles = self._validate(prompt, features)
        text = self.prompt_text(prompt, rows, cols)
        enc = self.tokenizer(text, return_tensors="pt")
        input_ids = enc["input_ids"].to(self.device)
        attention_mask = enc["attention_mask"].to(self.device)
        n_image_tokens = sum(tiles) * self.image_seq_len
        n_placeholders = int((input_ids == self.image_token_id).sum())
        if n_placeholders != n_image_tokens:
            raise BadRequestError(
                f"the prompt holds {n_placeholders} image tokens after tokenization, "
                f"expected {n_image_tokens}"
            )
        with torch.inference_mode():
            embeds = self.model.get_input_embeddings()(input_ids)
            image_embeds = features.features.to(device=self.device, dtype=self.dtype)
            if self.connector is not None:
                per_tile = image_embeds.reshape(sum(tiles), self.tokens_per_tile, self.feature_dim)
                image_embeds = self.connector(per_tile).reshape(n_image_tokens, -1)
            image_embeds = image_embeds.to(embeds.dtype)
            mask = (input_ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, image_embeds)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": embeds}


def load_tx_half(
    folder: Path, split_point: SplitPoint = SplitPoint.AFTER_VISION_TOWER, **kwargs: Any
) -> TxHalf:
    return Idefics3TxHalf(folder, split_point, **kwargs)


def load_rx_half(
    folder: Path, split_point: SplitPoint = SplitPoint.AFTER_VISION_TOWER, **kwargs: Any
) -> RxHalf:
    return Idefics3RxHalf(folder, split_point, **kwargs)
