"""LLaVA split adapter (`LlavaForConditionalGeneration`: vision tower → MLP projector → LM).

Tx (`LlavaTxHalf`) holds only the image processor, the vision tower and — when split
after it — the projector; it reads just those tensors from the checkpoint. Rx
(`LlavaRxHalf`) holds the full model minus the vision tower (minus the projector too
when the Tx already applied it) and rebuilds the prompt for the tokens that arrived.

Split points and the features on the wire (``[tokens, dim]``, images concatenated):

- ``after_vision_tower``: the selected vision hidden states (``vision_feature_layer``,
  CLS dropped under the ``default`` strategy), ``dim = vision hidden size x number of
  feature layers``;
- ``after_projector``: the projector outputs, ``dim = text hidden size``.

Both reproduce `LlavaModel.get_image_features` exactly, so split generation gives the
same token ids as the unsplit model (see `shared.split.reference`).

Token-id convention (Rx `generate` and the reference): the new ids, prompt excluded,
cut at the first stop id (EOS or pad), which is itself excluded.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoProcessor,
    LlavaForConditionalGeneration,
)
from transformers.generation.streamers import BaseStreamer
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.utils import logging as hf_logging

from shared.errors import BadRequestError, CodecError, ModelError
from shared.split import read_model_config
from shared.split.base import (
    CodecSupport,
    GenerationOptions,
    RxHalf,
    SplitPoint,
    TokenCallback,
    TxHalf,
    VisionFeatures,
)

log = logging.getLogger(__name__)

ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaModel")
MODEL_TYPES = ("llava",)

# Where each part lives in a saved checkpoint, most specific first: transformers 5 in-memory
# names (``model.<part>.``) and the original hub layout (``<part>.``), which is also what
# transformers 5 writes back on `save_pretrained`.
VISION_TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
# Wrapper levels that some transformers versions have inside the vision tower and others not
# (CLIP/SigLIP `…VisionModel.vision_model` before transformers 5).
_OPTIONAL_INNER_PREFIXES = ("vision_model.",)
# Buffers that old checkpoints store but current modules recompute.
_IGNORED_SUFFIXES = ("position_ids",)


# --------------------------------------------------------------------------------------------
# Helpers shared with `shared.split.reference`


def build_conversation(prompt: str, num_images: int) -> list[dict[str, Any]]:
    """One user turn: ``num_images`` images, then the text."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def chat_text(processor: Any, prompt: str, num_images: int) -> str:
    """The checkpoint's chat template applied to `build_conversation`, with the generation prompt."""
    text = processor.apply_chat_template(
        build_conversation(prompt, num_images), add_generation_prompt=True, tokenize=False
    )
    if isinstance(text, list):  # some processors return a batch
        text = text[0]
    return str(text)


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids (generation config, model config, tokenizer) and the pad id."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        if source is None:
            continue
        for attr in ("eos_token_id", "pad_token_id"):
            value = getattr(source, attr, None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
    text_config = getattr(getattr(model, "config", None), "text_config", None)
    for attr in ("eos_token_id", "pad_token_id"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def truncate_at_stop(token_ids: Sequence[int], stop_ids: set[int]) -> list[int]:
    """The ids before the first stop id (which is excluded)."""
    out: list[int] = []
    for t in token_ids:
        if int(t) in stop_ids:
            break
        out.append(int(t))
    return out


def generation_kwargs(options: GenerationOptions) -> dict[str, Any]:
    """`model.generate` keyword arguments for ``options`` (greedy when temperature is 0)."""
    kwargs: dict[str, Any] = {"max_new_tokens": int(options.max_new_tokens)}
    if options.temperature == 0:
        kwargs["do_sample"] = False
        # Neutralise sampling settings a checkpoint's generation_config may carry.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(
            do_sample=True,
            temperature=float(options.temperature),
            top_p=float(options.top_p),
            top_k=int(options.top_k),  # 0 disables top-k
            remove_invalid_values=True,  # a NaN/inf logit must not reach torch.multinomial
        )
    return kwargs


@contextlib.contextmanager
def seeded(options: GenerationOptions, device: torch.device) -> Iterator[None]:
    """Seed the RNG for sampling (``options.seed``) without disturbing the caller's RNG state."""
    if options.temperature == 0:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(options.seed))
        yield


def resolve_dtype(config: Any, dtype: torch.dtype | str | None) -> torch.dtype:
    """``dtype`` if given, else the checkpoint's dtype (float32 when it has none), as `from_pretrained`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None and dtype != "auto":
        return getattr(torch, str(dtype))
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, torch.dtype):
        return stored
    if isinstance(stored, str) and isinstance(getattr(torch, stored, None), torch.dtype):
        return getattr(torch, stored)
    return torch.float32


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' "Loading weights" progress bars (stderr noise in servers) for the block."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class _TokenStreamer(BaseStreamer):
    """Forwards each new token id to a callback; skips the prompt and stops at a stop id."""

    def __init__(self, on_token: TokenCallback, stop_ids: set[int]) -> None:
        self._on_token = on_token
        self._stop_ids = stop_ids
        self._prompt_seen = False
        self._stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first pushes the prompt ids
            self._prompt_seen = True
            return
        if self._stopped:
            return
        for t in value.reshape(-1).tolist():
            if int(t) in self._stop_ids:
                self._stopped = True
                return
            self._on_token(int(t))

    def end(self) -> None:
        self._stopped = True


# --------------------------------------------------------------------------------------------
# Reading part of a checkpoint


def checkpoint_key_files(folder: Path) -> dict[str, Path]:
    """Tensor name → safetensors file, for a single-file or sharded checkpoint."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot read {index}: {e}") from e
        return {str(k): folder / str(v) for k, v in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(
            f"{folder} has no *.safetensors weights (only safetensors checkpoints can be split; "
            "convert .bin checkpoints with save_pretrained)"
        )
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for k in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[k] = f
    return out


def load_part(
    module: nn.Module,
    key_files: dict[str, Path],
    prefixes: Sequence[str],
    part: str,
    folder: Path,
) -> None:
    """Load ``module``'s state from the checkpoint tensors under the first of ``prefixes`` that has any.

    Missing tensors raise ModelError; unexpected ones are logged and skipped.
    """
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in key_files)), None)
    if prefix is None:
        looked = " or ".join(prefixes)
        raise ModelError(
            f"checkpoint {folder} has no {part} weights (looked for keys starting with {looked})"
        )
    expected = set(module.state_dict().keys())
    wanted: dict[str, str] = {}  # module key → checkpoint key
    unexpected: list[str] = []
    for key in key_files:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        candidates = [rest]
        for inner in _OPTIONAL_INNER_PREFIXES:
            candidates.append(rest[len(inner) :] if rest.startswith(inner) else inner + rest)
        target = next((c for c in candidates if c in expected), None)
        if target is None:
            if not rest.endswith(_IGNORED_SUFFIXES):
                unexpected.append(key)
            continue
        wanted[target] = key
    missing = sorted(expected - wanted.keys())
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise ModelError(f"checkpoint {folder} lacks {part} tensors (under {prefix!r}): {shown}")
    if unexpected:
        log.warning(
            "ignoring %d unexpected %s tensors in %s, e.g. %s", len(unexpected), part, folder, unexpected[0]
        )

    by_file: dict[Path, list[str]] = {}
    for target, key in wanted.items():
        by_file.setdefault(key_files[key], []).append(target)
    state: dict[str, torch.Tensor] = {}
    for file, targets in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            for target in targets:
                state[target] = handle.get_tensor(wanted[target])
    module.load_state_dict(state, strict=True)


def select_image_features(
    hidden_states: Sequence[torch.Tensor], vision_feature_layer: int | Sequence[int], strategy: str
) -> torch.Tensor:
    """`LlavaModel.get_image_features`' selection: ``[images, tokens, dim]`` before the projector."""
    if isinstance(vision_feature_layer, int):
        selected = hidden_states[vision_feature_layer]
        if strategy == "default":
            selected = selected[:, 1:]
        return selected
    pool = [hidden_states[i] for i in vision_feature_layer]
    if strategy == "default":
        pool = [hs[:, 1:] for hs in pool]
    return torch.cat(pool, dim=-1)


def _num_feature_layers(config: Any) -> int:
    layer = config.vision_feature_layer
    return 1 if isinstance(layer, int) else len(layer)


def _check_strategy(config: Any) -> str:
    strategy = str(config.vision_feature_select_strategy)
    if strategy not in ("default", "full"):
        raise ModelError(
            f"unsupported vision_feature_select_strategy {strategy!r} (expected default or full)"
        )
    return strategy


# --------------------------------------------------------------------------------------------
# The halves


def cls_attention(
    vision_tower: nn.Module,
    hidden_states: Sequence[torch.Tensor],
    vision_feature_layer: int | Sequence[int],
    strategy: str,
) -> torch.Tensor | None:
    """CLS-token attention (head-averaged) to each selected token: ``[images, tokens]``.

    Taken in the encoder layer that produced the selected features (the last one
    when several are concatenated), recomputed from that layer's input so the
    tower can keep its fast attention kernel. Aligned with `select_image_features`.
    None when the tower has no CLS token or no CLIP-style layers (e.g. SigLIP).
    """
    inner = getattr(vision_tower, "vision_model", vision_tower)
    embeddings = getattr(inner, "embeddings", None)
    layers = getattr(getattr(inner, "encoder", None), "layers", None)
    if getattr(embeddings, "class_embedding", None) is None or layers is None:
        return None
    layer = vision_feature_layer if isinstance(vision_feature_layer, int) else vision_feature_layer[-1]
    index = layer % len(hidden_states)  # hidden_states[index] is the output of layers[index - 1]
    if index == 0 or index > len(layers):
        return None
    block = layers[index - 1]
    attn = getattr(block, "self_attn", None)
    if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "num_heads", "head_dim", "scale")):
        return None
    assert attn is not None
    h = block.layer_norm1(hidden_states[index - 1])
    images, tokens, _ = h.shape
    q = attn.q_proj(h[:, :1]).view(images, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(images, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
    weights = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)
    scores = weights.mean(dim=1)[:, 0]  # [images, tokens], CLS first
    return scores[:, 1:] if strategy == "default" else scores


def load_hf_config(folder: Path) -> Any:
    """The checkpoint's transformers config; ModelError (naming the folder) when it does not load."""
    read_model_config(folder)
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:  # transformers raises many kinds
        raise ModelError(f"cannot load the config of {folder}: {e}") from e


class HfTxHalf(TxHalf):
    """What the Hugging Face adapters' Tx halves share: parameter count and plain preprocessing.

    Subclasses set ``image_processor`` and implement `torch_modules` and `encode`.
    """

    image_processor: Any

    def torch_modules(self) -> list[nn.Module]:
        """The torch modules this half holds."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for m in self.torch_modules() for p in m.parameters())

    def preprocess(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        if not images:
            raise BadRequestError("at least one image is required")
        out = self.image_processor(images=list(images), return_tensors="pt")
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


class LlavaTxHalf(HfTxHalf):
    """Image processor + vision tower (+ projector for ``after_projector``); no language model."""

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
        self.dtype = resolve_dtype(self.config, dtype)
        self.strategy = _check_strategy(self.config)
        self.vision_feature_layer = self.config.vision_feature_layer

        key_files = checkpoint_key_files(self.folder)
        try:
            self.vision_tower: nn.Module = AutoModel.from_config(self.config.vision_config)
        except Exception as e:
            raise ModelError(f"cannot build the vision tower of {self.folder}: {e}") from e
        load_part(self.vision_tower, key_files, VISION_TOWER_PREFIXES, "vision tower", self.folder)
        self.vision_tower.to(device=self.device, dtype=self.dtype).eval()

        self.projector: nn.Module | None = None
        if self.split_point is SplitPoint.AFTER_PROJECTOR:
            self.projector = LlavaMultiModalProjector(self.config)
            load_part(self.projector, key_files, PROJECTOR_PREFIXES, "projector", self.folder)
            self.projector.to(device=self.device, dtype=self.dtype).eval()
            self.feature_dim = int(self.config.text_config.hidden_size)
        else:
            self.feature_dim = int(self.config.vision_config.hidden_size) * _num_feature_layers(self.config)
        # CLS-attention scores for prune:score=cls, where the tower has a CLS token (CLIP).
        embeddings = getattr(
            getattr(self.vision_tower, "vision_model", self.vision_tower), "embeddings", None
        )
        self.token_scores = ("cls",) if getattr(embeddings, "class_embedding", None) is not None else ()
        # Same as LlavaRxHalf: the Rx expands <image> to however many tokens arrive.
        self.codec_support = CodecSupport(
            token_reduction=True,
            fold_linear=self.split_point is SplitPoint.AFTER_VISION_TOWER,
            reason=""
            if self.split_point is SplitPoint.AFTER_VISION_TOWER
            else "split after the projector: the language model's first op is a norm, not a Linear",
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
        return [m for m in (self.vision_tower, self.projector) if m is not None]

    def encode(self, pixel_inputs: dict[str, torch.Tensor]) -> VisionFeatures:
        return self._encode(pixel_inputs, "")

    def encode_scored(self, pixel_inputs: dict[str, torch.Tensor], kind: str) -> VisionFeatures:
        if kind not in self.token_scores:
            raise CodecError(
                f"{type(self).__name__} cannot compute {kind!r} token scores "
                f"(available: {', '.join(self.token_scores) or 'none'})"
            )
        return self._encode(pixel_inputs, kind)

    def _encode(self, pixel_inputs: dict[str, torch.Tensor], score_kind: str) -> VisionFeatures:
        pixel_values = pixel_inputs.get("pixel_values")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise BadRequestError("pixel_values must be a [images, channels, height, width] tensor")
        with torch.inference_mode():
            pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
            outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
            selected = select_image_features(outputs.hidden_states, self.vision_feature_layer, self.strategy)
            scores = None
            if score_kind == "cls":
                scores = cls_attention(
                    self.vision_tower, outputs.hidden_states, self.vision_feature_layer, self.strategy
                )
                if scores is None:
                    raise CodecError(
                        f"the vision tower of {self.folder} has no CLS attention to score tokens"
                    )
            if self.projector is not None:
                selected = self.projector(selected)
        num_images, tokens, dim = selected.shape
        return VisionFeatures(
            features=selected.reshape(num_images * tokens, dim).contiguous(),
            meta={"tokens_per_image": [int(tokens)] * int(num_images)},
            scores=None if scores is None else scores.reshape(-1).float(),
        )


class HfRxHalf(RxHalf):
    """Generation shared by the Hugging Face adapters: `build_inputs` then `model.generate`.

    Subclasses set ``model``, ``tokenizer``, ``stop_ids`` and ``device`` and implement
    `build_inputs` (whatever keyword arguments their model's `generate` needs).
    """

    model: Any
    tokenizer: Any
    stop_ids: set[int]
    device: torch.device

    def context_length(self) -> int | None:
        text_config = self.model.config.get_text_config()
        positions = getattr(text_config, "max_position_embeddings", None)
        return int(positions) if isinstance(positions, int) and positions > 0 else None

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def precheck(self, prompt: str, shape: tuple[int, int], meta: dict[str, list[int]]) -> None:
        validate = getattr(self, "_validate", None)
        if validate is not None:
            # A meta-device tensor has a shape and a dtype but no storage: the family's own checks
            # (token counts vs grids/tiles, feature dim) run on the header before any payload is read.
            validate(prompt, VisionFeatures(features=torch.empty(shape, device="meta"), meta=meta))

    def generate(
        self,
        prompt: str,
        features: VisionFeatures,
        options: GenerationOptions,
        on_token: TokenCallback | None = None,
    ) -> list[int]:
        inputs = self.build_inputs(prompt, features)
        prompt_len = int(inputs["input_ids"].shape[1])
        context = self.context_length()
        if context is not None and prompt_len + options.max_new_tokens > context:
            raise BadRequestError(
                f"prompt ({prompt_len} tokens with the image) + max_new_tokens ({options.max_new_tokens}) "
                f"exceeds the model's context of {context} positions"
            )
        streamer = _TokenStreamer(on_token, self.stop_ids) if on_token is not None else None
        with torch.inference_mode(), seeded(options, self.device):
            out = self.model.generate(**inputs, **generation_kwargs(options), streamer=streamer)
        return truncate_at_stop(out[0, prompt_len:].tolist(), self.stop_ids)

    def decode_tokens(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))


class LlavaRxHalf(HfRxHalf):
    """(Projector +) language model + generation; no vision tower."""

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
            self.processor = AutoProcessor.from_pretrained(self.folder)
            with quiet_progress_bars():
                model = LlavaForConditionalGeneration.from_pretrained(
                    self.folder, dtype=dtype if dtype is not None else "auto"
                )
        except Exception as e:
            raise ModelError(f"cannot load {self.folder}: {e}") from e
        model.to(self.device)  # type: ignore[arg-type]  # transformers' decorated `to` confuses mypy
        self.model: Any = model.eval()
        self.dtype = next(self.model.parameters()).dtype
        config = self.model.config
        _check_strategy(config)
        # The Tx runs the vision tower (and the projector, for after_projector): free them here.
        self.model.model.vision_tower = None
        self.projector: nn.Module | None = self.model.model.multi_modal_projector
        if self.split_point is SplitPoint.AFTER_PROJECTOR:
            self.model.model.multi_modal_projector = None
            self.projector = None
            self.feature_dim = int(config.text_config.hidden_size)
            self.codec_support = CodecSupport(
                token_reduction=True,
                reason="split after the projector: the language model's first op is a norm, not a Linear",
            )
        else:
            self.feature_dim = int(config.vision_config.hidden_size) * _num_feature_layers(config)
            # LLaVA's projector maps each token on its own, starting with linear_1.
            self.codec_support = CodecSupport(token_reduction=True, fold_linear=True)

        self.tokenizer = self.processor.tokenizer
        self.image_token = str(getattr(self.processor, "image_token", None) or "<image>")
        self.image_token_id = int(config.image_token_id)
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)
        vision = config.vision_config
        patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
        self.full_tokens_per_image = patches + (1 if _check_strategy(config) == "full" else 0)

    def leading_linear(self) -> nn.Linear | None:
        if self.projector is None:
            return None
        first = getattr(self.projector, "linear_1", None)
        return first if isinstance(first, nn.Linear) else None

    # -- inputs --------------------------------------------------------------------------

    def _validate(self, prompt: str, features: VisionFeatures) -> list[int]:
        if not isinstance(prompt, str):
            raise BadRequestError("prompt must be a string")
        if self.image_token in prompt:
            raise BadRequestError(f"prompt must not contain the image placeholder {self.image_token!r}")
        x = features.features
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise BadRequestError(f"features must be a 2-D [tokens, dim] tensor, got shape {shape}")
        if not (x.is_floating_point()):
            raise BadRequestError(f"features must be floating point, got {x.dtype}")
        leading = self.leading_linear() if features.pre_projected else None
        if features.pre_projected and leading is None:
            raise BadRequestError("pre-projected features need a projector that starts with a Linear")
        dim = self.feature_dim if leading is None else int(leading.out_features)
        if int(x.shape[1]) != dim:
            raise BadRequestError(
                f"feature dim {int(x.shape[1])} does not match this model's {self.split_point.value} "
                f"feature dim {dim}"
            )
        tpi = [int(t) for t in features.tokens_per_image]
        if not tpi or any(t <= 0 for t in tpi):
            raise BadRequestError(f"tokens_per_image must be a non-empty list of positive ints, got {tpi}")
        if sum(tpi) != int(x.shape[0]):
            raise BadRequestError(
                f"features have {int(x.shape[0])} tokens but tokens_per_image {tpi} sums to {sum(tpi)}"
            )
        full = self.full_tokens_per_image
        if full is not None and any(t > full for t in tpi):
            raise BadRequestError(
                f"tokens_per_image {tpi}: this model's vision encoder makes {full} tokens per image, "
                "and token reduction only ever sends fewer"
            )
        return tpi

    def prompt_text(self, prompt: str, tokens_per_image: Sequence[int]) -> str:
        """Chat template applied, each image placeholder expanded to its token count."""
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

    def build_inputs(self, prompt: str, features: VisionFeatures) -> dict[str, Any]:
        tpi = self._validate(prompt, features)
        text = self.prompt_text(prompt, tpi)
        enc = self.tokenizer(text, return_tensors="pt")
        input_ids = enc["input_ids"].to(self.device)
        attention_mask = enc["attention_mask"].to(self.device)
        n_placeholders = int((input_ids == self.image_token_id).sum())
        if n_placeholders != sum(tpi):
            raise BadRequestError(
                f"the prompt holds {n_placeholders} image tokens after tokenization, expected {sum(tpi)}"
            )
        with torch.inference_mode():
            embeds = self.model.get_input_embeddings()(input_ids)
            image_embeds = features.features.to(device=self.device, dtype=self.dtype).unsqueeze(0)
            if self.projector is not None and features.pre_projected:
                # linear_1 already applied (folded into the codec's decoder): the rest of the projector.
                projector: Any = self.projector
                image_embeds = projector.linear_2(projector.act(image_embeds))
            elif self.projector is not None:
                image_embeds = self.projector(image_embeds)
            image_embeds = image_embeds.to(embeds.dtype)
            mask = (input_ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, image_embeds)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": embeds}


def load_tx_half(
    folder: Path, split_point: SplitPoint = SplitPoint.AFTER_VISION_TOWER, **kwargs: Any
) -> TxHalf:
    return LlavaTxHalf(folder, split_point, **kwargs)


def load_rx_half(
    folder: Path, split_point: SplitPoint = SplitPoint.AFTER_VISION_TOWER, **kwargs: Any
) -> RxHalf:
    return LlavaRxHalf(folder, split_point, **kwargs)
