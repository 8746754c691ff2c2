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
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

if TYPE_CHECKING:
    from shared.codecs import Codec


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
    scores: optional per-token importance ``[tokens]`` that the Tx half computes for a
    codec that asks (`TxHalf.encode_scored`, e.g. CLS attention); never sent.
    pre_projected: the Rx already applied `RxHalf.leading_linear` (``features`` is then
    ``[tokens, out_features]``; see `shared.codecs.fold`), so the Rx half skips it. Rx only.
    """

    features: torch.Tensor
    meta: dict[str, list[int]] = field(default_factory=dict)
    scores: torch.Tensor | None = None
    pre_projected: bool = False

    @property
    def tokens_per_image(self) -> list[int]:
        return self.meta.get("tokens_per_image", [int(self.features.shape[0])])


MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 10.0
MAX_TOP_K = 1_000_000  # above any vocabulary
MAX_SEED = 2**64 - 1  # torch.manual_seed's range (and the wire's uint64)


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
        # NaN fails every comparison below, so it is refused too. A tiny positive temperature
        # overflows logits / temperature into NaN probabilities: 0 (greedy) or >= MIN_TEMPERATURE.
        if not (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise BadRequestError(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                f"got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise BadRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise BadRequestError(f"top_k must be in [0, {MAX_TOP_K}], got {self.top_k}")
        if not 0 <= self.seed <= MAX_SEED:
            raise BadRequestError(f"seed must be in [0, 2**64 - 1], got {self.seed}")


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


def check_codec_support(
    codec: Codec, support: CodecSupport, family: str, token_scores: tuple[str, ...] | None = None
) -> None:
    """Refuse (CodecError) a codec that needs something the split `family` does not support.

    Called at configuration time on the Tx (building a codec; with the Tx half's
    `token_scores`) and when a packet arrives on the Rx, so an unsupported codec
    fails before any inference.
    """
    from shared.errors import CodecError

    if codec.token_reducers and not support.token_reduction:
        stage = codec.token_reducers[0]
        raise CodecError(
            f"codec {codec.spec!r} is refused for {family}: its stage {stage.name!r} sends fewer visual "
            "tokens than the vision encoder makes, and this split does not support token reduction "
            f"({support.reason or 'no reason given'})"
        )
    if token_scores is not None and codec.score_kind and codec.score_kind not in token_scores:
        available = ", ".join(token_scores) or "none"
        raise CodecError(
            f"codec {codec.spec!r} is refused for {family}: its first stage ranks tokens by "
            f"{codec.score_kind!r} scores, which this Tx half cannot compute (available: {available})"
        )


def features_for_codec(codec: Codec, features: VisionFeatures) -> tuple[tuple[int, int], VisionFeatures]:
    """The shape `codec` decodes `features` to, and `features` with meta for that token count.

    The packet header declares both, so the Rx builds its prompt for the tokens that
    arrive. A token-reducing codec works on the concatenated features as a whole, so
    it is refused (CodecError) for more than one image: it would mix their tokens.
    """
    from shared.errors import CodecError

    tokens, dim = (int(n) for n in features.features.shape)
    decoded = codec.decoded_shape(tokens, dim)
    if decoded[0] == tokens:
        return decoded, features
    per_image = features.tokens_per_image
    if len(per_image) != 1:
        raise CodecError(
            f"codec {codec.spec!r} reduces the token count, which needs a single image per request; "
            f"got {len(per_image)} images ({per_image} tokens)"
        )
    meta = dict(features.meta) | {"tokens_per_image": [decoded[0]]}
    return decoded, VisionFeatures(features=features.features, meta=meta, scores=features.scores)


# Called with each newly generated token id; lets servers stream text as it is produced.
TokenCallback = Callable[[int], None]


class TxHalf(ABC):
    """Image processor + vision encoder (+ projector when split after it)."""

    split_point: SplitPoint
    # What the split accepts (the same as the Rx half's): checked when the Tx builds a codec.
    codec_support: CodecSupport = CodecSupport(reason="not declared by this adapter")
    # Per-token score kinds `encode_scored` can attach (e.g. "cls" for prune:score=cls).
    token_scores: tuple[str, ...] = ()

    @abstractmethod
    def preprocess(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Run the checkpoint's image processor; returns model inputs (pixel_values, ...)."""

    @abstractmethod
    def encode(self, pixel_inputs: dict[str, torch.Tensor]) -> VisionFeatures:
        """Run the vision side up to the split point."""

    def encode_scored(self, pixel_inputs: dict[str, torch.Tensor], kind: str) -> VisionFeatures:
        """`encode`, with `VisionFeatures.scores` set to per-token `kind` scores (see `token_scores`)."""
        from shared.errors import CodecError

        raise CodecError(f"{type(self).__name__} cannot compute {kind!r} token scores")


class RxHalf(ABC):
    """Connector/projector (when split before it) + language model + generation."""

    split_point: SplitPoint
    feature_dim: int  # the `dim` that `VisionFeatures.features` must have
    codec_support: CodecSupport = CodecSupport(reason="not declared by this adapter")

    # Visual tokens per image a full (not token-reduced) packet carries, when the family fixes it
    # (LLaVA); None where it depends on the image (tiles, grids): `precheck` then checks the meta.
    full_tokens_per_image: int | None = None

    def leading_linear(self) -> torch.nn.Linear | None:
        """The connector's first Linear when `codec_support.fold_linear`, else None."""
        return None

    def context_length(self) -> int | None:
        """The language model's positions (max_position_embeddings); None when unknown."""
        return None

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of the user prompt alone (the chat template adds a few more)."""
        return 0

    def lm_tokens(self, tokens: int) -> int:
        """Language-model positions taken by `tokens` packet rows (patches merge into fewer)."""
        return tokens

    def precheck(self, prompt: str, shape: tuple[int, int], meta: dict[str, list[int]]) -> None:
        """Check a packet's declared shape and metadata against this split before any payload
        arrives (BadRequestError); allocates nothing. The default checks nothing."""
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
