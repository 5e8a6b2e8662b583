"""Decoding raw images safely into RGB: one definition shared by `prepare` and `shard`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from attnpipe import storage
from attnpipe.errors import AttnpipeError

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class BadImage(AttnpipeError):
    """A file that cannot become a training image; `reason` is short and human-readable."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    width: int  # after EXIF orientation
    height: int
    mode: str  # as stored, before conversion to RGB
    format: str
    sha256: str
    bytes: int


def load_rgb(path: Path | str, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Fully decode `path` (a local path or an object-store URL) as an upright 8-bit RGB image
    or raise `BadImage`.

    `draft_size` lets JPEG decoding skip resolution it does not need (DCT scaling): the result
    is at least that large on its shorter side, so shard-time resizing reads far fewer pixels.
    """
    image, _ = _open(path, max_pixels, draft_size, data=read_image_bytes(path))
    return image


def inspect(path: Path | str, max_pixels: int) -> ImageInfo:
    """Validate `path` (a local path or an object-store URL) by decoding it fully; return its
    facts or raise `BadImage`."""
    data = read_image_bytes(path)
    image, original = _open(path, max_pixels, None, data=data)
    return ImageInfo(
        width=image.width,
        height=image.height,
        mode=original.mode,
        format=original.format or "unknown",
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
    )


def read_image_bytes(location: Path | str) -> bytes:
    """The file's bytes, or `BadImage` saying why there are none (the same reasons for a local
    path and an object-store URL)."""
    try:
        if storage.is_url(location):
            data = storage.read_bytes(location)
        else:
            data = storage.local_path(location).read_bytes()
    except FileNotFoundError:
        raise BadImage("missing file") from None
    except OSError as error:
        raise BadImage(f"unreadable file: {error.strerror or error}") from None
    if not data:
        raise BadImage("zero-byte file")
    return data


def _open(
    path: Path | str, max_pixels: int, draft_size: int | None, data: bytes | None = None
) -> tuple[Image.Image, Image.Image]:
    import io

    if data is None:
        data = read_image_bytes(path)
    try:
        original = Image.open(io.BytesIO(data))
        if original.width * original.height > max_pixels:
            raise BadImage(
                f"too large: {original.width}x{original.height} exceeds "
                f"prepare.max_pixels={max_pixels}"
            )
        if draft_size and original.format == "JPEG":
            scale = min(original.width, original.height) / draft_size
            if scale >= 2:
                original.draft("RGB", (original.width // scale, original.height // scale))
        original.load()
    except BadImage:
        raise
    except Image.DecompressionBombError as error:
        raise BadImage(f"too large: {error}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"corrupt or truncated: {error}") from None
    return _to_rgb(ImageOps.exif_transpose(original)), original


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        # convert("L") would clip 16-bit values at 255; rescale instead.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max(initial=0) > 255 else 255.0
        gray = np.clip(array * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min(initial=0)), float(array.max(initial=1))
        gray = ((array - low) / max(high - low, 1e-12) * 255).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become white, not black: how the image looks in a viewer.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image
