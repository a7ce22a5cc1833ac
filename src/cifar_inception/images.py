"""Reading one image file safely and turning it into a square RGB CIFAR-style array: 32x32,
or the image size a model was trained on.

Used by the image-folder data sources, ``predict`` and ``serve``, so that every entry point
treats modes (RGBA, greyscale, palette, 16-bit) and decompression bombs the same way.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cifar_inception.errors import CifarInceptionError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The raster formats of those suffixes, and only them: Pillow would otherwise also try
# formats such as EPS, whose plug-in runs Ghostscript on the file.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")

# A photo of 40 megapixels is fine; a 200-megapixel PNG of a few kilobytes is an attack.
MAX_PIXELS = 40_000_000


class ImageError(CifarInceptionError):
    """An image that cannot be read, is corrupt, or is too large to decode."""


def _open_regular_file(path: str | os.PathLike, label: str):
    """A binary file object for ``path``, refusing anything but a regular file.

    The file is opened without blocking, so that a FIFO is refused instead of waiting
    forever for a writer.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ImageError(f"{label}: cannot open ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a folder" if
                stat.S_ISDIR(mode) else "a device or socket")
        raise ImageError(f"{label}: not a regular file ({kind})")
    return os.fdopen(fd, "rb")


# Pillow's decoders fail on crafted files with more than OSError and ValueError (a TIFF whose
# strip offsets are stored as doubles raises TypeError; others raise struct.error, IndexError
# or SyntaxError), so any exception but MemoryError while a file is opened and decoded means
# "not a readable image".
_NOT_AN_IMAGE = "not an image file Pillow can read (PNG, JPEG, GIF, BMP, WebP or TIFF)"


@contextlib.contextmanager
def _decoding(source: str | os.PathLike | bytes,
              name: str | None) -> Iterator[tuple[BinaryIO, str]]:
    """The source as an open file and its name for messages; whatever fails while it is
    decoded leaves as one :class:`ImageError` that names it."""
    label = name or (str(source) if not isinstance(source, bytes) else "<upload>")
    fp = io.BytesIO(source) if isinstance(source, bytes) else _open_regular_file(source, label)
    with fp:
        try:
            yield fp, label
        except ImageError:
            raise
        except Image.DecompressionBombError:
            raise ImageError(f"{label}: refused as a possible decompression bomb") from None
        except UnidentifiedImageError:
            raise ImageError(f"{label}: {_NOT_AN_IMAGE}") from None
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure (see _NOT_AN_IMAGE)
            raise ImageError(f"{label}: corrupt or truncated image ({exc})") from None


def image_header(source: str | os.PathLike | bytes, *,
                 name: str | None = None) -> tuple[int, int, bool]:
    """Width, height and whether it has transparency, from the header alone, for budgeting
    decodes: compositing transparency on white takes about twice the memory of the rest."""
    with _decoding(source, name) as (fp, _), Image.open(fp, formats=IMAGE_FORMATS) as image:
        alpha = image.mode in _ALPHA_MODES or "transparency" in image.info
        return image.size[0], image.size[1], alpha


def open_image(source: str | os.PathLike | bytes, *, name: str | None = None,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image from a path or bytes, refusing decompression bombs.

    Only :data:`IMAGE_FORMATS` are tried, and only regular files are read. The pixel count
    is checked from the header before any pixel is decoded. An EXIF orientation is applied,
    so the image comes back upright.
    """
    with _decoding(source, name) as (fp, label):
        image = Image.open(fp, formats=IMAGE_FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"{label}: {width}x{height} pixels is over the limit of "
                             f"{max_pixels:,} (possible decompression bomb)")
        image.load()
        if image.mode == "F" and not _all_finite(image):
            raise ImageError(f"{label}: its pixels include values that are not finite "
                             "numbers (NaN or infinity)")
        if "exif" in image.info:
            # Phone photos store their rotation in EXIF; show them upright, as a viewer does.
            ImageOps.exif_transpose(image, in_place=True)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparent pixels are composited on white (as a viewer shows them); 16- and 32-bit
    greyscale is scaled down to 8 bits rather than clipped.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GREY:
        return _scale_to_grey(image).convert("RGB")
    if (image.mode == "P" and "transparency" in image.info) or image.mode in _ALPHA_MODES:
        return _composite_on_white(image)
    return image.convert("RGB")


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _composite_on_white(image: Image.Image, chunk: int = 1 << 20) -> Image.Image:
    """Transparent pixels on white, a band of about ``chunk`` pixels at a time.

    Whole-image RGBA copies, a white background and the composite would take four times
    the decoded image (some 800 MB at 40 megapixels); bands keep it to the RGB result.
    """
    width, height = image.size
    out = Image.new("RGB", image.size)
    rows = max(1, chunk // max(width, 1))
    for y in range(0, height, rows):
        band = image.crop((0, y, width, min(y + rows, height))).convert("RGBA")
        white = Image.new("RGBA", band.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(white, band).convert("RGB"), (0, y))
    return out


_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # 16- and 32-bit greyscale


def _all_finite(image: Image.Image, chunk: int = 1 << 20) -> bool:
    """Whether a 32-bit float image holds numbers only, read a band of about ``chunk``
    pixels at a time (its extrema skip a NaN)."""
    width, height = image.size
    rows = max(1, chunk // max(width, 1))
    return all(np.isfinite(np.asarray(image.crop((0, y, width, min(y + rows, height))))).all()
               for y in range(0, height, rows))


def _scale_to_grey(image: Image.Image, chunk: int = 1 << 20) -> Image.Image:
    """16- and 32-bit greyscale -> 8-bit "L", scaled to its range.

    Done a band of about ``chunk`` pixels at a time, cropped from the image: a float64 copy
    of a whole 40-megapixel image would be 320 MB.
    """
    width, height = image.size
    peak = float(image.getextrema()[1]) if width and height else 0.0
    top = 65535.0 if image.mode.startswith("I;16") else max(peak, 1.0)
    if image.mode == "I" and peak <= 255:
        top = 255.0
    grey = np.empty((height, width), dtype=np.uint8)
    rows = max(1, chunk // max(width, 1))
    for y in range(0, height, rows):
        band = np.asarray(image.crop((0, y, width, min(y + rows, height))), dtype=np.float64)
        grey[y:y + rows] = np.clip(band / top * 255.0 + 0.5, 0, 255)
    return Image.fromarray(grey, mode="L")


def to_cifar_array(image: Image.Image, size: int = 32) -> np.ndarray:
    """RGB, resized to ``size`` x ``size`` with Pillow's antialiased bicubic filter, as uint8
    (size, size, 3).

    The whole image is squeezed to the square (no crop), as CIFAR-10's own images were made
    from whole photos; an image already that size is left exactly as it is.
    """
    if image.mode in _WIDE_GREY:
        image = _scale_to_grey(image)
    if image.mode == "L":
        # Greyscale is resized while it is one channel: the same pixels as resizing its RGB
        # copy (each channel is resampled alike), without a full-size RGB copy in memory.
        return np.asarray(to_rgb(_to_square(image, size)), dtype=np.uint8)
    return np.asarray(_to_square(to_rgb(image), size), dtype=np.uint8)


def _to_square(image: Image.Image, size: int) -> Image.Image:
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)


def load_cifar_array(source: str | os.PathLike | bytes, *, name: str | None = None,
                     max_pixels: int = MAX_PIXELS, size: int = 32) -> np.ndarray:
    """Open, convert and resize one image: the common path of predict, serve and image trees."""
    return to_cifar_array(open_image(source, name=name, max_pixels=max_pixels), size)


def find_images(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (walked recursively, sorted) into image paths."""
    found: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found.extend(sorted(_image_files_under(entry)))
        else:
            found.append(entry)
    return found


def _image_files_under(root: Path) -> list[Path]:
    """Image files anywhere below ``root``, walked with a stack of folders rather than by
    recursion, so that a tree of any depth is no RecursionError. Links to folders are not
    followed (as ``Path.rglob``), so a link loop cannot make the walk endless."""
    images, folders = [], [root]
    while folders:
        try:
            with os.scandir(folders.pop()) as scan:
                entries = list(scan)
        except PermissionError:
            continue  # a folder we may not read is skipped, as rglob skips it
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                folders.append(Path(entry.path))
            elif entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                images.append(Path(entry.path))
    return images
