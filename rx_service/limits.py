"""Bounds tied to the model: what a packet may declare and what a request may ask for.

Checked from the header and the prompt before any payload byte is accepted, so a small
packet cannot buy a large amount of work (a 549-byte packet declaring 65,536 tokens used
to keep the Rx busy for ~50 s):

- a full-token codec must carry exactly the tokens the split's vision side makes (LLaVA:
  patches per image; tiled/gridded families: what the header's tiles/grid give);
- a token-reducing codec carries at most that many;
- prompt tokens + image tokens (as the language model sees them) + max_new_tokens must fit
  the model's context (max_position_embeddings). The Rx half repeats the last check exactly
  on the built prompt (chat template included) before generating.
"""

from __future__ import annotations

from shared.codecs import Codec
from shared.errors import BadRequestError
from shared.protocol import pb
from shared.protocol.packet import header_meta
from shared.split import GenerationOptions, RxHalf


def check_token_budget(
    half: RxHalf, codec: Codec, header: pb.FeatureHeader, prompt: str, options: GenerationOptions
) -> None:
    tokens, dim = int(header.shape[0]), int(header.shape[1])
    meta = header_meta(header)
    full = half.full_tokens_per_image
    if full is not None:
        per_image = meta.get("tokens_per_image", [tokens])
        if codec.token_reducers:
            if any(n > full for n in per_image):
                raise BadRequestError(
                    f"packet declares {per_image} tokens per image; this model's vision encoder makes "
                    f"{full}, and codec {codec.spec!r} only ever sends fewer"
                )
        elif any(n != full for n in per_image):
            raise BadRequestError(
                f"packet declares {per_image} tokens per image; this model's vision encoder makes "
                f"exactly {full} per image, and codec {codec.spec!r} keeps every token"
            )
    # The family's own shape/meta checks on a storage-less tensor (tiles, grids, dims).
    half.precheck(prompt, (tokens, dim), meta)
    context = half.context_length()
    if context is None:
        return
    image_positions = half.lm_tokens(tokens)
    if image_positions + options.max_new_tokens > context:
        raise BadRequestError(
            f"image tokens ({image_positions}) + max_new_tokens ({options.max_new_tokens}) exceed the "
            f"model's context of {context} positions"
        )
    prompt_tokens = half.prompt_tokens(prompt)
    if prompt_tokens + image_positions + options.max_new_tokens > context:
        raise BadRequestError(
            f"prompt ({prompt_tokens} tokens) + image ({image_positions} tokens) + max_new_tokens "
            f"({options.max_new_tokens}) exceed the model's context of {context} positions"
        )
