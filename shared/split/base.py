"""The split interface: a VLM cut into a Tx half and an Rx half.

    image, prompt ──► TxHalf.preprocess ──► TxHalf.encode ──► VisionFeatures ──► codec ──► wire
    wire ──► codec ──► VisionFeatures ──► RxHalf.generate(prompt, features) ──► token ids / text

`VisionFeatures` is everything the Rx needs from the image: one 2-D tensor of
visual tokens (all images concatenated, ``[tokens, dim]``) plus integer metadata
(tokens per image, patch grids, ...). Each model family provides one
`SplitAdapter` that builds both halves from a checkpoint folder.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image


class SplitPoint(str, enum.Enum):
    """Where the model is cut."""

    AFTER_VISION_TOWER = "after_vision_tower"
    AFTER_PROJECTOR = "after_projector"


@dataclass
class VisionFeatures:
    """Visual tokens for one request, before compression / after decompression.

    features: ``[tokens, dim]``, images concatenated in prompt order.
    meta: integer lists the Rx needs to rebuild the prompt (``tokens_per_image``
    always; family-specific keys such as ``image_grid_thw`` as needed).
    """

    features: torch.Tensor
    meta: dict[str, list[int]] = field(default_factory=dict)

    @property
    def tokens_per_image(self) -> list[int]:
        return self.meta.get("tokens_per_image", [int(self.features.shape[0])])


@dataclass
class GenerationOptions:
    """Decoding options shared by every entry point. ``temperature == 0`` is greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def validate(self, max_new_tokens_limit: int = 1024) -> None:
        from shared.errors import BadRequestError

        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise BadRequestError(
                f"max_new_tokens must be in [1, {max_new_tokens_limit}], got {self.max_new_tokens}"
            )
        if not 0.0 <= self.temperature <= 10.0:
            raise BadRequestError(f"temperature must be in [0, 10], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise BadRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise BadRequestError(f"top_k must be >= 0, got {self.top_k}")


@dataclass(frozen=True)
class CodecSupport:
    """What the Rx side of a split can accept, so codec configs are checked before inference.

    token_reduction: the Rx accepts any order-preserving subset/merge of the visual tokens
        (fewer tokens than the Tx produced) and builds the prompt for the count that arrives.
    fold_linear: the first thing the Rx applies to each token is an ``nn.Linear`` (see
        `RxHalf.leading_linear`), so a linear codec decoder can be folded into it.
    reason: why a capability is missing (shown in the config-time error).
    """

    token_reduction: bool = False
    fold_linear: bool = False
    reason: str = ""


# Called with each newly generated token id; lets servers stream text as it is produced.
TokenCallback = Callable[[int], None]


class TxHalf(ABC):
    """Image processor + vision encoder (+ projector when split after it)."""

    split_point: SplitPoint

    @abstractmethod
    def preprocess(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Run the checkpoint's image processor; returns model inputs (pixel_values, ...)."""

    @abstractmethod
    def encode(self, pixel_inputs: dict[str, torch.Tensor]) -> VisionFeatures:
        """Run the vision side up to the split point."""


class RxHalf(ABC):
    """Connector/projector (when split before it) + language model + generation."""

    split_point: SplitPoint
    feature_dim: int  # the `dim` that `VisionFeatures.features` must have
    codec_support: CodecSupport = CodecSupport(reason="not declared by this adapter")

    def leading_linear(self) -> torch.nn.Linear | None:
        """The connector's first Linear when `codec_support.fold_linear`, else None."""
        return None

    @abstractmethod
    def build_inputs(self, prompt: str, features: VisionFeatures) -> dict[str, Any]:
        """Chat template + image-token expansion for the token count that arrived."""

    @abstractmethod
    def generate(
        self,
        prompt: str,
        features: VisionFeatures,
        options: GenerationOptions,
        on_token: TokenCallback | None = None,
    ) -> list[int]:
        """Generate; returns the new token ids (prompt excluded)."""

    @abstractmethod
    def decode_tokens(self, token_ids: list[int]) -> str:
        """Token ids to text, special tokens skipped."""
