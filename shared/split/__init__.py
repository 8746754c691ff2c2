"""Split adapters: build the Tx and Rx halves of a checkpoint folder.

The adapter is chosen from the checkpoint's ``config.json`` (``architectures`` first,
then ``model_type``). Families register with `register_adapter`; each adapter module
provides ``load_tx_half(folder, split_point, **kwargs)`` and
``load_rx_half(folder, split_point, **kwargs)`` and is imported only when used.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from shared.errors import ModelError
from shared.split.base import (
    CodecSupport,
    GenerationOptions,
    RxHalf,
    SplitPoint,
    TokenCallback,
    TxHalf,
    VisionFeatures,
    check_codec_support,
    features_for_codec,
)

__all__ = [
    "ADAPTERS",
    "AdapterSpec",
    "CodecSupport",
    "GenerationOptions",
    "RxHalf",
    "SplitPoint",
    "TokenCallback",
    "TxHalf",
    "VisionFeatures",
    "adapter_for",
    "check_codec_support",
    "features_for_codec",
    "load_rx_half",
    "load_tx_half",
    "read_model_config",
    "register_adapter",
    "supported_architectures",
    "tx_weight_prefixes",
]


@dataclass(frozen=True)
class AdapterSpec:
    """One model family: the module implementing it and the configs it accepts."""

    family: str
    module: str  # e.g. "shared.split.llava"
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    # Checkpoint tensor prefixes the Tx reads: the vision side, and the connector when the model
    # is cut after it (what `load_part` looks under; used to download only those shards).
    vision_prefixes: tuple[str, ...] = ()
    connector_prefixes: tuple[str, ...] = ()

    def _load(self, name: str) -> Callable[..., Any]:
        return cast(Callable[..., Any], getattr(importlib.import_module(self.module), name))

    def load_tx_half(self, folder: Path, split_point: SplitPoint, **kwargs: Any) -> TxHalf:
        return cast(TxHalf, self._load("load_tx_half")(folder, split_point, **kwargs))

    def load_rx_half(self, folder: Path, split_point: SplitPoint, **kwargs: Any) -> RxHalf:
        return cast(RxHalf, self._load("load_rx_half")(folder, split_point, **kwargs))


# family name → spec
ADAPTERS: dict[str, AdapterSpec] = {}


def register_adapter(
    family: str,
    module: str,
    architectures: Iterable[str],
    model_types: Iterable[str] = (),
    vision_prefixes: Iterable[str] = (),
    connector_prefixes: Iterable[str] = (),
) -> AdapterSpec:
    """Register (or replace) a family's adapter."""
    spec = AdapterSpec(
        family,
        module,
        tuple(architectures),
        tuple(model_types),
        tuple(vision_prefixes),
        tuple(connector_prefixes),
    )
    ADAPTERS[family] = spec
    return spec


register_adapter(
    "llava",
    "shared.split.llava",
    architectures=("LlavaForConditionalGeneration", "LlavaModel"),
    model_types=("llava",),
    vision_prefixes=("model.vision_tower.", "vision_tower."),
    connector_prefixes=("model.multi_modal_projector.", "multi_modal_projector."),
)
register_adapter(
    "qwen2_vl",
    "shared.split.qwen2_vl",
    architectures=("Qwen2VLForConditionalGeneration", "Qwen2VLModel"),
    model_types=("qwen2_vl",),
    vision_prefixes=("model.visual.", "visual."),  # the patch merger (connector) lives in visual too
)
register_adapter(
    "qwen2_5_vl",
    "shared.split.qwen2_vl",
    architectures=("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"),
    model_types=("qwen2_5_vl",),
    vision_prefixes=("model.visual.", "visual."),  # the patch merger (connector) lives in visual too
)
register_adapter(
    "qwen3_vl",
    "shared.split.qwen3_vl",
    architectures=("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"),
    model_types=("qwen3_vl", "qwen3_vl_moe"),
    vision_prefixes=("model.visual.", "visual."),  # mergers and deepstack mergers too
)
register_adapter(
    "idefics3",
    "shared.split.idefics3",
    architectures=("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"),
    model_types=("idefics3", "smolvlm"),
    vision_prefixes=("model.vision_model.", "vision_model."),
    connector_prefixes=("model.connector.", "connector."),
)


def supported_architectures() -> list[str]:
    return sorted({a for spec in ADAPTERS.values() for a in spec.architectures})


def read_model_config(folder: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder; ModelError when absent or unreadable."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object")
    return data


def adapter_for(folder: Path) -> AdapterSpec:
    """The adapter for the checkpoint in ``folder``; ModelError when none fits."""
    return adapter_for_config(read_model_config(Path(folder)), str(folder))


def tx_weight_prefixes(config: dict[str, Any], split_point: SplitPoint | str) -> tuple[str, ...]:
    """The checkpoint tensor prefixes the Tx half reads for ``split_point`` (see `AdapterSpec`)."""
    spec = adapter_for_config(config, "this checkpoint")
    if SplitPoint(split_point) is SplitPoint.AFTER_PROJECTOR:
        return spec.vision_prefixes + spec.connector_prefixes
    return spec.vision_prefixes


def adapter_for_config(config: dict[str, Any], folder: str) -> AdapterSpec:
    """The adapter for a parsed ``config.json``; ModelError naming ``folder`` when none fits."""
    architectures = [str(a) for a in (config.get("architectures") or [])]
    model_type = str(config.get("model_type") or "")
    for arch in architectures:
        for spec in ADAPTERS.values():
            if arch in spec.architectures:
                return spec
    for spec in ADAPTERS.values():
        if model_type in spec.model_types:
            return spec
    named = ", ".join(architectures) or "(none)"
    raise ModelError(
        f"unsupported model architecture {named} (model_type {model_type or '(none)'!r}) in {folder}; "
        f"supported architectures: {', '.join(supported_architectures())}"
    )


def load_tx_half(
    folder: Path, split_point: SplitPoint = SplitPoint.AFTER_VISION_TOWER, **kwargs: Any
) -> TxHalf:
    """The Tx half (image processor + vision side up to ``split_point``) of the checkpoint in ``folder``."""
    return adapter_for(folder).load_tx_half(Path(folder), SplitPoint(split_point), **kwargs)


def load_rx_half(
    folder: Path, split_point: SplitPoint = SplitPoint.AFTER_VISION_TOWER, **kwargs: Any
) -> RxHalf:
    """The Rx half (the rest of the model + generation) of the checkpoint in ``folder``."""
    return adapter_for(folder).load_rx_half(Path(folder), SplitPoint(split_point), **kwargs)
