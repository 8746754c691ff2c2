"""Image codecs for the cloud-only baseline: the Tx sends the image, the Rx runs the whole model.

Images are first brought to the model's input resolution (what its image processor would
resize/crop to), so a codec is never charged for pixels the model would throw away.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class ImageCodec:
    """One PIL image format at one quality (quality 0: the format has none, e.g. PNG)."""

    fmt: str  # PIL format name: JPEG, WEBP, PNG
    quality: int = 0

    @property
    def name(self) -> str:
        return f"{self.fmt.lower()}:{self.quality}" if self.quality else self.fmt.lower()

    def encode(self, image: Image.Image) -> bytes:
        buf = io.BytesIO()
        kwargs: dict[str, Any] = {}
        if self.fmt == "PNG":
            kwargs["optimize"] = True
        else:
            kwargs["quality"] = self.quality
        image.convert("RGB").save(buf, format=self.fmt, **kwargs)
        return buf.getvalue()

    @staticmethod
    def decode(data: bytes) -> Image.Image:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")


DEFAULT_IMAGE_CODECS: tuple[ImageCodec, ...] = (
    *(ImageCodec("JPEG", q) for q in (10, 30, 50, 75, 90)),
    ImageCodec("WEBP", 50),
    ImageCodec("WEBP", 80),
    ImageCodec("PNG"),
)


def parse_image_codec(text: str) -> ImageCodec:
    """``jpeg:75``, ``webp:80``, ``png``."""
    fmt, _, quality = text.strip().partition(":")
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}.get(fmt.lower(), "")
    if not fmt:
        raise ValueError(f"unknown image codec {text!r} (jpeg:Q, webp:Q, png)")
    return ImageCodec(fmt, int(quality) if quality and fmt != "PNG" else 0)


def input_size(image_processor: Any) -> tuple[int, int] | None:
    """(width, height) the image processor feeds the model, when it declares a fixed one."""
    for attr in ("crop_size", "size"):
        size = getattr(image_processor, attr, None)
        if size is None:
            continue
        if isinstance(size, int):
            return size, size
        get = size.get if isinstance(size, dict) else lambda k, s=size: getattr(s, k, None)
        h, w = get("height"), get("width")
        if isinstance(h, int) and isinstance(w, int):
            return w, h
        edge = get("shortest_edge")
        # CLIP-style: shortest edge then a square center crop. (Elsewhere, e.g. Qwen-VL's
        # shortest_edge, it is a pixel count, and the input size depends on the image.)
        if isinstance(edge, int) and attr == "size" and center_crops(image_processor):
            return edge, edge
    return None


def center_crops(image_processor: Any) -> bool:
    """Whether the processor resizes the shortest edge and then center-crops (CLIP-style)."""
    return bool(getattr(image_processor, "do_center_crop", False))


def at_input_resolution(image: Image.Image, size: tuple[int, int] | None, crop: bool = False) -> Image.Image:
    """`image` at the model's input size (bicubic), unchanged when it already is or none is known.

    With `crop` (CLIP-style processors) the image is scaled to cover `size` and center-cropped,
    as the processor would; otherwise it is resized to `size`.
    """
    image = image.convert("RGB")
    if size is None or image.size == size:
        return image
    if not crop:
        return image.resize(size, Image.Resampling.BICUBIC)
    scale = max(size[0] / image.width, size[1] / image.height)
    w, h = max(size[0], round(image.width * scale)), max(size[1], round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size[0]) // 2, (h - size[1]) // 2
    return image.crop((left, top, left + size[0], top + size[1]))
