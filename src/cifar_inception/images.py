"""Reading one image file safely and turning it into a 32x32 RGB CIFAR-style array.

Used by the image-folder data sources, ``predict`` and ``serve``, so that every entry point
treats modes (RGBA, greyscale, palette, 16-bit) and decompression bombs the same way.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cifar_inception.errors import CifarInceptionError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# A photo of 40 megapixels is fine; a 200-megapixel PNG of a few kilobytes is an attack.
MAX_PIXELS = 40_000_000


class ImageError(CifarInceptionError):
    """An image that cannot be read, is corrupt, or is too large to decode."""


def open_image(source: str | os.PathLike | bytes, *, name: str | None = None,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image from a path or bytes, refusing decompression bombs.

    The pixel count is checked from the header before any pixel is decoded. An EXIF
    orientation is applied, so the image comes back upright.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<upload>")
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError as exc:
        raise ImageError(f"{label}: cannot open ({exc.strerror or exc})") from None
    with fp:
        try:
            image = Image.open(fp)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{label}: {width}x{height} pixels is over the limit of {max_pixels:,} "
                    "(possible decompression bomb)"
                )
            image.load()
            if "exif" in image.info:
                # Phone photos store their rotation in EXIF; show them upright, as a viewer does.
                ImageOps.exif_transpose(image, in_place=True)
        except ImageError:
            raise
        except Image.DecompressionBombError:
            raise ImageError(f"{label}: refused as a possible decompression bomb") from None
        except UnidentifiedImageError:
            raise ImageError(f"{label}: not an image file Pillow can read") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"{label}: corrupt or truncated image ({exc})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparent pixels are composited on white (as a viewer shows them); 16- and 32-bit
    greyscale is scaled down to 8 bits rather than clipped.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        if image.mode == "I" and values.max() <= 255:
            top = 255.0
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_cifar_array(image: Image.Image) -> np.ndarray:
    """RGB, resized to 32x32 with Pillow's antialiased bicubic filter, as uint8 (32, 32, 3).

    The whole image is squeezed to 32x32 (no crop), as CIFAR-10's own images were made
    from whole photos; an image already 32x32 is left exactly as it is.
    """
    rgb = to_rgb(image)
    if rgb.size != (32, 32):
        rgb = rgb.resize((32, 32), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(rgb, dtype=np.uint8)


def load_cifar_array(source: str | os.PathLike | bytes, *, name: str | None = None,
                     max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Open, convert and resize one image: the common path of predict and serve."""
    return to_cifar_array(open_image(source, name=name, max_pixels=max_pixels))


def find_images(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (walked recursively, sorted) into image paths."""
    found: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found.extend(sorted(p for p in entry.rglob("*")
                                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(entry)
    return found
