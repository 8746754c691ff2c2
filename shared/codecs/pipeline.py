"""Spec strings, presets and the `Codec` that runs a pipeline of stages.

    spec "int8|zstd:3" ──parse──► [Int8(), Zstd(level=3)] ──► Codec(spec="int8|zstd:level=3")

    encode: features ─► check ─► {"x"} ─► tensor stages ─► pack ─► byte stages ─► payload
    decode: payload ─► byte stages⁻¹ ─► unpack ─► tensor stages⁻¹ ─► {"x"} ─► check ─► features

Grammar: stages joined by ``|``; each is ``name`` or ``name:params``, params
comma-separated, positional (in declared order) then ``key=value``. A spec that
is exactly a preset name expands to the preset. The canonical spec spells every
parameter, so equal codecs have equal fingerprints whatever the user typed.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence

import torch

# The transform and calibrated stages (registered on import).
import shared.codecs.ae
import shared.codecs.kmeans
import shared.codecs.pca
import shared.codecs.sparse
import shared.codecs.svd  # noqa: F401
from shared.codecs import (  # noqa: F401  (registers the stages)
    cast,
    linear_quant,
    mulaw,
    pool,
    prune,
    raw,
    salient,
    tome,
    zstd,
)
from shared.codecs.base import (
    FLOAT_DTYPES,
    STAGES,
    ByteStage,
    CodecContext,
    Fields,
    FieldSpec,
    Layout,
    Stage,
    TensorStage,
    dtype_name,
)
from shared.codecs.calibration import ArtifactLike, attach_artifact
from shared.codecs.fold import CompactCode
from shared.codecs.reduce import TokenReducer
from shared.codecs.serialize import max_packed_size, pack, unpack
from shared.errors import CodecError, PacketTooLargeError

PRESETS: dict[str, str] = {
    "lossless": "raw|zstd:3",
    "fp16": "fp16|zstd:3",
    "int8": "int8|zstd:3",
    # The K most salient tokens and their positions, PCA-16, 4-bit codes with fp16 scales; the Rx
    # fills the other positions with a calibrated vector, so every family accepts them. Calibrated:
    # the reference model ships their artifacts (README: 95.0 % at 350 B and 92.0 % at 208 B on its
    # held-out set). Token pooling, the earlier presets, kept 61 % and 25 % on that model.
    "balanced": "salient:k=32|pca:k=16|linear:bits=4,scale=fp16|zstd:3",
    "tiny": "salient:k=16|pca:k=16|linear:bits=4,scale=fp16|zstd:3",
}

# Default cap on any buffer decode produces, whatever shape the caller declares.
MAX_DECODED_BYTES = 1 << 30


def _choices() -> str:
    return f"valid stages: {', '.join(sorted(STAGES))}; presets: {', '.join(sorted(PRESETS))}"


def parse_stage(text: str) -> Stage:
    """Build one stage from ``name`` or ``name:p1,key=p2``."""
    name, _, args = text.partition(":")
    name = name.strip()
    cls = STAGES.get(name)
    if cls is None:
        raise CodecError(f"unknown codec stage {name!r}; {_choices()}")
    values: dict[str, object] = {}
    names = [p.name for p in cls.params if not p.keyword_only]
    if ":" in text and not args.strip():
        raise CodecError(f"stage {name!r}: ':' must be followed by parameters")
    keyword_seen = False
    for position, arg in enumerate(args.split(",") if args.strip() else []):
        key, eq, value = arg.partition("=")
        if not eq:
            if not names:
                raise CodecError(f"stage {name!r} takes no parameters, got {args.strip()!r}")
            if keyword_seen or position >= len(names):
                raise CodecError(
                    f"stage {name!r}: unexpected positional parameter {arg.strip()!r}; positional "
                    f"parameters ({', '.join(names)}) come first, in that order, then key=value"
                )
            key, value = names[position], key
        keyword_seen = keyword_seen or bool(eq)
        key = key.strip()
        if not key or not value.strip():
            raise CodecError(f"stage {name!r}: parameter {arg.strip()!r} needs both a name and a value")
        if key in values:
            raise CodecError(f"stage {name!r}: parameter {key!r} given twice")
        values[key] = value
    return cls(**values)


def _check_order(stages: Sequence[Stage]) -> None:
    """Reject pipelines whose stages cannot be chained, naming the culprit."""
    seen: set[str] = set()
    fields = ["x"]
    after = "the input"
    byte_stage: str | None = None
    quantizer: str | None = None
    other_tensor_stage: str | None = None  # the first tensor stage that is not a token reducer
    for stage in stages:
        if stage.name in seen:
            raise CodecError(f"stage {stage.name!r} appears twice")
        seen.add(stage.name)
        if isinstance(stage, ByteStage):
            byte_stage = stage.name
            continue
        if not isinstance(stage, TensorStage):
            raise CodecError(f"{stage!r} is neither a TensorStage nor a ByteStage")
        if byte_stage is not None:
            raise CodecError(
                f"tensor stage {stage.name!r} cannot follow byte stage {byte_stage!r}: "
                "tensor stages come first, then byte stages"
            )
        if isinstance(stage, TokenReducer) and other_tensor_stage is not None:
            raise CodecError(
                f"token reducer {stage.name!r} cannot follow {other_tensor_stage!r}: token reducers "
                "work on the float features, so they come first, before quantizers, casts and "
                f"other tensor stages (e.g. '{stage.spec}|int8|zstd')"
            )
        if stage.score_kind and after != "the input":
            raise CodecError(
                f"stage {stage.spec!r} ranks tokens by the vision encoder's {stage.score_kind!r} scores, "
                f"so it must be the first stage (it follows {after})"
            )
        if not isinstance(stage, TokenReducer):
            other_tensor_stage = other_tensor_stage or stage.name
        if stage.quantizer and quantizer is not None:
            raise CodecError(f"two quantizers ({quantizer!r} and {stage.name!r}); a codec holds at most one")
        missing = [f for f in stage.inputs if f not in fields]
        if missing:
            raise CodecError(
                f"stage {stage.name!r} needs field(s) {', '.join(missing)}, but after {after} "
                f"the pipeline carries {', '.join(fields) or 'nothing'}"
            )
        fields = [f for f in fields if f not in stage.inputs] + list(stage.outputs)
        after = repr(stage.name)
        quantizer = stage.name if stage.quantizer else quantizer


def build_codec(spec: str, artifact: ArtifactLike | None = None) -> Codec:
    """A `Codec` from a preset name (``"int8"``) or a spec string (``"int8|zstd:3"``).

    Calibrated stages (``pca``, ``kmeans``, ``zstd:dict=1``) load their fitted state from
    `artifact` (a `CalibrationArtifact` or the path of one); without it they raise CodecError.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise CodecError(
            f"codec spec must be a non-empty string: a preset or stages joined by '|'; {_choices()}"
        )
    name = spec.strip()
    expanded = PRESETS.get(name, name)
    parts = expanded.split("|")
    for i, part in enumerate(parts):
        if not part.strip():
            raise CodecError(f"codec spec {expanded!r}: stage {i + 1} is empty")
    stages = [parse_stage(part) for part in parts]
    attach_artifact("|".join(s.spec for s in stages), stages, artifact)
    return Codec(name, stages)


def stage_output_context(stage: Stage, ctx: CodecContext) -> CodecContext:
    """The context the stages after `stage` see: its ``output_shape(ctx)`` when it changes the shape
    of ``x`` (``pca``: [T, k]; ``svd``: [T + D, r]), else `ctx` unchanged."""
    output_shape = getattr(stage, "output_shape", None)
    if output_shape is None:
        return ctx
    tokens, dim = output_shape(ctx)
    return CodecContext(tokens, dim, ctx.dtype)


class Codec:
    """Encodes ``[tokens, dim]`` float features to bytes and back, with a fixed pipeline of stages."""

    def __init__(self, name: str, stages: Sequence[Stage]) -> None:
        _check_order(stages)
        self.name = name
        self.stages = tuple(stages)
        self.tensor_stages = tuple(s for s in stages if isinstance(s, TensorStage))
        self.byte_stages = tuple(s for s in stages if isinstance(s, ByteStage))
        # Stages that send fewer tokens than they get: the decoded shape is `decoded_shape(...)`.
        self.token_reducers = tuple(s for s in stages if isinstance(s, TokenReducer))
        self.spec = "|".join(s.spec for s in stages)
        if self.spec in PRESETS:
            # build_codec() would read this spec as the preset; the Rx rebuilds codecs from specs.
            raise CodecError(
                f"spec {self.spec!r} alone would be read as the preset {self.spec!r} "
                f"({PRESETS[self.spec]}); write 'raw|{self.spec}' for the stage without byte stages"
            )
        digests = [d for s in stages if (d := s.artifact_digest()) is not None]
        fingerprinted = "\n".join([self.spec, *digests])
        self.fingerprint = "sha256:" + hashlib.sha256(fingerprinted.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Codec(name={self.name!r}, spec={self.spec!r})"

    def decoded_shape(self, tokens: int, dim: int) -> tuple[int, int]:
        """The shape `decode` returns for features of shape ``(tokens, dim)`` (without running).

        Differs from the input only when the codec holds token reducers; the packet
        header declares this shape.
        """
        ctx = _check_declared((tokens, dim), torch.float32)
        tokens = ctx.tokens
        for stage in self.token_reducers:
            tokens = stage.output_tokens(tokens)
        return (tokens, ctx.dim)

    def layout(self, ctx: CodecContext) -> Layout:
        """The fields the serializer writes for features that decode to this shape and dtype."""
        layout: Layout = {"x": FieldSpec(ctx.shape, (ctx.dtype,))}
        for stage, stage_ctx in zip(self.tensor_stages, self.stage_contexts(ctx), strict=True):
            produced = stage.layout({k: layout[k] for k in stage.inputs}, stage_ctx)
            layout = {k: v for k, v in layout.items() if k not in stage.inputs} | produced
        return layout

    def stage_contexts(self, ctx: CodecContext) -> list[CodecContext]:
        """The context each tensor stage's `layout`/`decode` sees, for features decoding to `ctx`."""
        contexts = []
        for stage in self.tensor_stages:
            contexts.append(ctx)
            ctx = stage_output_context(stage, ctx)
        return contexts

    @property
    def score_kind(self) -> str:
        """The per-token scores `encode` needs from the Tx half (``"cls"``), or ``""``."""
        return self.tensor_stages[0].score_kind if self.tensor_stages else ""

    def encode(self, features: torch.Tensor, *, scores: torch.Tensor | None = None) -> bytes:
        """Payload for `features`; `scores` (``[tokens]``) are needed when `score_kind` is set."""
        ctx = _check_features(features)
        fields: Fields = {"x": features.detach().to("cpu")}
        stage_ctx = ctx
        for stage in self.tensor_stages:
            inputs = {k: fields[k] for k in stage.inputs}
            if stage.score_kind and scores is not None:
                inputs["scores"] = scores.detach().to("cpu").float()
            produced = stage.encode(inputs, stage_ctx)
            fields = {k: v for k, v in fields.items() if k not in stage.inputs} | produced
            if isinstance(stage, TokenReducer):  # later stages see the reduced features
                ctx = CodecContext(stage.output_tokens(ctx.tokens), ctx.dim, ctx.dtype)
            stage_ctx = ctx if isinstance(stage, TokenReducer) else stage_output_context(stage, stage_ctx)
        data = pack(fields, self.layout(ctx))
        for byte_stage in self.byte_stages:
            data = byte_stage.encode(data, ctx)
        return data

    def decode(
        self,
        payload: bytes | bytearray | memoryview,
        shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        *,
        max_decoded_bytes: int = MAX_DECODED_BYTES,
    ) -> torch.Tensor:
        """Features of exactly `shape` and `dtype` from `payload`; CodecError if it does not decode.

        Nothing read from the payload is trusted: sizes are bounded by what `shape`
        implies, and no buffer larger than `max_decoded_bytes` is produced
        (PacketTooLargeError otherwise).
        """
        ctx = _check_declared(shape, dtype)
        fields = self._decode_fields(payload, ctx, max_decoded_bytes)
        x = fields["x"]
        FieldSpec(ctx.shape, FLOAT_DTYPES).check("x", x.dtype, tuple(x.shape))
        if not bool(torch.isfinite(x).all()):
            raise CodecError("corrupt payload: decoded features contain NaN or Inf")
        return x.to(ctx.dtype)

    def linear_decoder(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(W [n, D], b [D]) when decode ends in a linear map x = code·W + b, else None.

        The first tensor stage must expose it (``pca``: basis and mean; ``sparse``: dictionary and
        mean) together with ``compact()``, and no token reducer may run. Lets the Rx fold the map
        into the connector's first Linear (`shared.codecs.fold`).
        """
        first = self.tensor_stages[0] if self.tensor_stages else None
        method = getattr(first, "linear_decoder", None)
        if method is None or not hasattr(first, "compact") or self.token_reducers:
            return None
        w, b = method()
        return torch.as_tensor(w), torch.as_tensor(b)

    def decode_compact(
        self,
        payload: bytes | bytearray | memoryview,
        shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        *,
        max_decoded_bytes: int = MAX_DECODED_BYTES,
    ) -> tuple[CompactCode, tuple[torch.Tensor, torch.Tensor]]:
        """`decode` without its final linear map: (code, (W, b)) with x = code.apply(W, b).

        Byte stages and quantizers are undone; the code is the first stage's dequantized
        coefficients (``pca``: dense [tokens, k]; ``sparse``: [tokens, k] plus atom indices).
        Same checks as `decode`; CodecError when `linear_decoder()` is None.
        """
        ctx = _check_declared(shape, dtype)
        decoder = self.linear_decoder()
        if decoder is None:
            raise CodecError(f"codec {self.spec!r} does not end its decode in a linear map")
        fields = self._decode_fields(payload, ctx, max_decoded_bytes, skip_first=True)
        first = self.tensor_stages[0]
        code: CompactCode = first.compact({k: fields[k] for k in first.outputs}, ctx)  # type: ignore[attr-defined]
        code.check(ctx.tokens, int(decoder[0].shape[0]))
        return code, decoder

    def _decode_fields(
        self,
        payload: bytes | bytearray | memoryview,
        ctx: CodecContext,
        max_decoded_bytes: int,
        *,
        skip_first: bool = False,
    ) -> Fields:
        """Byte stages⁻¹, unpack, tensor stages⁻¹ (all but the first one with `skip_first`)."""
        if isinstance(max_decoded_bytes, bool) or not isinstance(max_decoded_bytes, int):
            raise CodecError(f"max_decoded_bytes must be an int, got {max_decoded_bytes!r}")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
        layout = self.layout(ctx)
        sizes = [max_packed_size(layout)]
        for byte_stage in self.byte_stages:
            sizes.append(byte_stage.max_encoded_size(sizes[-1]))
        largest = max(*sizes, ctx.tokens * ctx.dim * ctx.dtype.itemsize)
        if largest > max_decoded_bytes:
            raise PacketTooLargeError(
                f"decoding {ctx.shape} {dtype_name(ctx.dtype)} with {self.spec!r} needs up to "
                f"{largest} bytes; the limit is {max_decoded_bytes}"
            )
        if len(payload) > sizes[-1]:
            raise PacketTooLargeError(
                f"payload of {len(payload)} bytes is larger than {self.spec!r} can produce "
                f"for {ctx.shape} {dtype_name(ctx.dtype)} (at most {sizes[-1]})"
            )

        data = bytes(payload)
        for byte_stage, max_size in zip(reversed(self.byte_stages), reversed(sizes[:-1]), strict=True):
            data = byte_stage.decode(data, ctx, max_size)
        fields = unpack(data, layout)
        skip = 1 if skip_first else 0
        stages = self.tensor_stages[skip:]
        for stage, stage_ctx in zip(reversed(stages), reversed(self.stage_contexts(ctx)[skip:]), strict=True):
            restored = stage.decode({k: fields[k] for k in stage.outputs}, stage_ctx)
            fields = {k: v for k, v in fields.items() if k not in stage.outputs} | restored
        return fields


def _check_features(features: object) -> CodecContext:
    if not isinstance(features, torch.Tensor):
        raise CodecError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise CodecError(f"features must be 2-D [tokens, dim], got shape {tuple(features.shape)}")
    if features.numel() == 0:
        raise CodecError(f"features must not be empty, got shape {tuple(features.shape)}")
    if features.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(dtype_name(d) for d in FLOAT_DTYPES)
        raise CodecError(f"features must be {allowed}, got {dtype_name(features.dtype)}")
    nan = int(torch.isnan(features).sum())
    inf = int(torch.isinf(features).sum())
    if nan or inf:
        raise CodecError(f"features contain {nan} NaN / {inf} Inf values; refusing to encode")
    return CodecContext(int(features.shape[0]), int(features.shape[1]), features.dtype)


def _check_declared(shape: Sequence[int], dtype: torch.dtype) -> CodecContext:
    problem = f"declared shape must be two positive ints (tokens, dim), got {shape!r}"
    try:
        dims = [operator.index(n) for n in shape if not isinstance(n, bool)]
    except TypeError:
        raise CodecError(problem) from None
    if len(dims) != 2 or len(shape) != 2 or min(dims) <= 0:
        raise CodecError(problem)
    if dtype not in FLOAT_DTYPES:
        allowed = ", ".join(dtype_name(d) for d in FLOAT_DTYPES)
        raise CodecError(f"declared dtype must be {allowed}, got {dtype!r}")
    return CodecContext(dims[0], dims[1], dtype)
