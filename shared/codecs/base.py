"""Stage abstractions shared by every codec stage, and the stage registry.

A codec is a pipeline of stages::

    encode:  {"x": features} ─► TensorStage ... ─► serialize ─► bytes ─► ByteStage ... ─► payload
    decode:  payload ─► ByteStage ... ─► bytes ─► deserialize ─► TensorStage ... ─► {"x": features}

Tensor stages map named tensors ("fields") to named tensors: each one consumes
the fields listed in ``inputs`` and produces those in ``outputs`` (e.g. ``int8``
turns ``x`` into ``q`` and ``scale``); decode runs the inverse. Byte stages
(``zstd``) map bytes to bytes. The design follows CompressAI's latent codecs:
small composable parts with symmetric ``encode``/``decode``.

Every stage also describes, without seeing any data, what it will produce for a
given decoded shape (its ``layout``). The decoder uses that description to bound
and check everything it reads from an untrusted payload before allocating.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch

from shared.errors import CodecError

Fields = dict[str, torch.Tensor]
ParamValue = int | float | str

# The dtypes a codec accepts as features and can be asked to decode to.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class CodecContext:
    """What both sides know about the features outside the payload.

    On encode: the input's shape and dtype. On decode: the shape and dtype the
    caller declares (from the packet header), which the result must have.
    """

    tokens: int
    dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.tokens, self.dim)


@dataclass(frozen=True)
class FieldSpec:
    """The shape and allowed dtypes of one field, known before any data is read.

    ``exact=False`` makes ``shape`` an upper bound per dimension, for stages
    whose output size depends on the data (e.g. token pruning).
    """

    shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    exact: bool = True

    @property
    def max_nbytes(self) -> int:
        return math.prod(self.shape) * max(d.itemsize for d in self.dtypes)

    def check(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """Raise CodecError unless a field of `dtype` and `shape` fits this spec."""
        if dtype not in self.dtypes:
            allowed = ", ".join(dtype_name(d) for d in self.dtypes)
            raise CodecError(f"field {name!r} has dtype {dtype_name(dtype)}, expected {allowed}")
        fits = len(shape) == len(self.shape) and all(
            (n == bound if self.exact else 0 <= n <= bound)
            for n, bound in zip(shape, self.shape, strict=False)
        )
        if not fits:
            relation = "" if self.exact else "at most "
            raise CodecError(f"field {name!r} has shape {tuple(shape)}, expected {relation}{self.shape}")


# Field name -> spec, in the order the fields are serialized.
Layout = dict[str, FieldSpec]


@dataclass(frozen=True)
class Param:
    """One stage parameter: its type, default and allowed values."""

    name: str
    kind: type[int] | type[float] | type[str]
    default: ParamValue
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    # Only as key=value in spec strings (e.g. zstd's dict), so positional specs keep their meaning.
    keyword_only: bool = False

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        kind = {int: "an integer", float: "a number", str: "a string"}[self.kind]
        if self.lo is not None and self.hi is not None:
            return f"{kind} in [{self.lo:g}, {self.hi:g}]"
        return kind

    def coerce(self, stage: str, value: object) -> ParamValue:
        """Parse (spec strings) or check (Python values) `value`; CodecError if invalid."""
        problem = f"stage {stage!r}: {self.name} must be {self.describe()}, got {value!r}"
        parsed: ParamValue
        if isinstance(value, str):
            try:
                parsed = self.kind(value.strip())
            except ValueError:
                raise CodecError(problem) from None
        elif isinstance(value, self.kind) and not isinstance(value, bool):
            parsed = value
        elif self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            parsed = float(value)
        else:
            raise CodecError(problem)
        if isinstance(parsed, float) and not math.isfinite(parsed):
            raise CodecError(problem)
        if self.choices and parsed not in self.choices:
            raise CodecError(problem)
        if isinstance(parsed, int | float) and (
            (self.lo is not None and parsed < self.lo) or (self.hi is not None and parsed > self.hi)
        ):
            raise CodecError(problem)
        return parsed

    def format(self, value: ParamValue) -> str:
        return repr(value) if isinstance(value, float) else str(value)


class Stage(ABC):
    """A named, parameterized pipeline step. Subclasses set `name` and `params`."""

    name: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, **values: object) -> None:
        known = {p.name: p for p in self.params}
        for key in values:
            if key not in known:
                raise CodecError(
                    f"stage {self.name!r} has no parameter {key!r}; {_param_choices(type(self))}"
                )
        for p in self.params:
            setattr(self, p.name, p.coerce(self.name, values.get(p.name, p.default)))

    @property
    def spec(self) -> str:
        """Canonical form: the name, then every parameter as key=value in declared order."""
        if not self.params:
            return self.name
        args = ",".join(f"{p.name}={p.format(getattr(self, p.name))}" for p in self.params)
        return f"{self.name}:{args}"

    def artifact_digest(self) -> str | None:
        """Hash of external data the stage depends on (e.g. a calibration file); joins the fingerprint."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"


class TensorStage(Stage):
    """Maps the fields named in `inputs` to those in `outputs`; decode is the inverse.

    ``quantizer`` marks stages that reduce precision (quantizers, 16-bit casts);
    a pipeline holds at most one, since stacking them only compounds the error.
    """

    inputs: ClassVar[tuple[str, ...]] = ("x",)
    outputs: ClassVar[tuple[str, ...]] = ("x",)
    quantizer: ClassVar[bool] = False
    # Per-token scores the stage ranks tokens by, computed by the Tx half (e.g. "cls": the vision
    # tower's CLS attention) and passed to `encode` as the field "scores"; "" for none. Never sent.
    score_kind: str = ""

    @abstractmethod
    def layout(self, fields: Layout, ctx: CodecContext) -> Layout:
        """Specs of `outputs`, given the specs of `inputs` (data-independent)."""

    @abstractmethod
    def encode(self, fields: Fields, ctx: CodecContext) -> Fields:
        """`inputs` -> `outputs`."""

    @abstractmethod
    def decode(self, fields: Fields, ctx: CodecContext) -> Fields:
        """`outputs` -> `inputs`. Fields were already checked against `layout`; values were not."""


class ByteStage(Stage):
    """Maps bytes to bytes (entropy coding, ...)."""

    @abstractmethod
    def max_encoded_size(self, size: int) -> int:
        """Upper bound on `encode` output for `size` input bytes; rejects oversized payloads early."""

    @abstractmethod
    def encode(self, data: bytes, ctx: CodecContext) -> bytes: ...

    @abstractmethod
    def decode(self, data: bytes, ctx: CodecContext, max_size: int) -> bytes:
        """Inverse of `encode`; must never produce (or allocate) more than `max_size` bytes."""


STAGES: dict[str, type[Stage]] = {}

StageT = TypeVar("StageT", bound=type[Stage])


def register_stage(cls: StageT) -> StageT:
    """Class decorator: make `cls` available in spec strings under `cls.name`."""
    name = getattr(cls, "name", "")
    if not name or not all(c.isalnum() or c == "_" for c in name):
        raise ValueError(f"stage class {cls.__name__} needs a name of letters, digits and '_', got {name!r}")
    if STAGES.get(name, cls) is not cls:
        raise ValueError(f"codec stage {name!r} is already registered by {STAGES[name].__name__}")
    if not issubclass(cls, TensorStage | ByteStage):
        raise ValueError(f"stage class {cls.__name__} must derive from TensorStage or ByteStage")
    STAGES[name] = cls
    return cls


def _param_choices(cls: type[Stage]) -> str:
    if not cls.params:
        return "it takes no parameters"
    return "valid parameters: " + ", ".join(p.name for p in cls.params)
