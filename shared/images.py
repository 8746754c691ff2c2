"""Turn whatever a user hands us into an RGB PIL image, or a precise ImageError."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared.errors import ImageError, PacketTooLargeError

ImageInput = str | Path | bytes | bytearray | Image.Image | np.ndarray


def image_to_bytes(image: ImageInput, max_bytes: int = 20 * 2**20) -> bytes:
    """Encode any accepted input as an image file (PNG unless it already is a file)."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        if path.stat().st_size > max_bytes:
            raise PacketTooLargeError(f"image file {path} is {path.stat().st_size} bytes; limit {max_bytes}")
        data = path.read_bytes()
    else:
        buf = io.BytesIO()
        to_pil(image).save(buf, format="PNG")
        data = buf.getvalue()
    if len(data) > max_bytes:
        raise PacketTooLargeError(f"image is {len(data)} bytes; limit {max_bytes}")
    return data


def to_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ImageError(f"numpy image must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
                arr = arr * 255.0
            arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr[..., :3])
    raise ImageError(f"unsupported image type {type(image).__name__}; pass a path, bytes, PIL image or array")


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode an untrusted image file with size limits checked before pixels are allocated."""
    if not data:
        raise ImageError("empty image upload")
    if len(data) > max_bytes:
        raise PacketTooLargeError(f"image upload of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size  # read from the header, nothing decoded yet
            if width * height > max_pixels:
                # An image bomb (a 107-byte PNG can declare 7071x7071) is refused before any pixel
                # buffer exists: Image.open reads only the header, .load() would allocate.
                raise ImageError(
                    f"image is {width}x{height} = {width * height} pixels; this Tx decodes at most "
                    f"{max_pixels} (max_image_pixels)"
                )
            img.load()
            return img.convert("RGB")
    except (PacketTooLargeError, ImageError):
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"upload is not a decodable image ({type(exc).__name__}: {exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"image file is corrupt or truncated ({exc})") from None
