"""Figures shared by ``cifar-inception data`` and the report.

Matplotlib is imported only when a figure is drawn, and only its object-oriented API is used
(a ``Figure`` rendered by the Agg canvas), so no window opens and pyplot's global state and
backend are left alone.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cifar_inception.errors import CifarInceptionError
from cifar_inception.fileio import atomic_write_bytes

GAP = 2          # white pixels between images
SCALE = 3        # screen pixels per image pixel
DPI = 100


@contextmanager
def plain_text() -> Iterator[None]:
    """matplotlib drawing every label as written (a decorator too): a '$' in a class name
    would otherwise start math text, and an unknown command in it fails the whole figure."""
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": False}):
        yield


def check_figure_path(path: str | os.PathLike) -> Path:
    """``path`` as a figure's file: not a folder, and with a suffix matplotlib writes (.png,
    .pdf, .svg, ...). Checked before the work that draws it."""
    from matplotlib.figure import Figure

    path = Path(path)
    if path.is_dir():
        raise CifarInceptionError(f"{path}: is a folder; give the figure's file name")
    supported = Figure().canvas.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in supported:
        choices = ", ".join("." + name for name in sorted(supported))
        raise CifarInceptionError(f"{path}: cannot write a figure as "
                                  f"{path.suffix or 'a file without a suffix'} (use {choices})")
    return path


@plain_text()
def class_grid(images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
               path: str | os.PathLike, per_class: int = 10, seed: int = 0) -> Path:
    """Write a figure of ``per_class`` random images of each class, one labelled row per class.

    ``images`` are uint8 (N, H, W, 3); the picks are seeded. A class with fewer images than
    ``per_class`` shows what it has. The file's suffix picks the format (.png, .pdf, .svg, ...);
    it is written atomically. Returns the path.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    path = check_figure_path(path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise CifarInceptionError(f"expected uint8 images of shape (N, H, W, 3), got "
                                  f"{images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise CifarInceptionError(f"{len(images)} images but {len(labels)} labels")
    if per_class < 1 or not classes:
        raise CifarInceptionError("a grid needs at least one class and one image per class")

    mosaic = _mosaic(images, labels, len(classes), per_class, seed)
    figure = _figure(mosaic, classes, images.shape[1])
    file_format = path.suffix.lower().lstrip(".")
    buffer = io.BytesIO()
    figure.savefig(buffer, format=file_format, dpi=DPI, bbox_inches="tight", pad_inches=0.05,
                   facecolor="white")
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        raise CifarInceptionError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _mosaic(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int,
            seed: int) -> np.ndarray:
    """One uint8 picture: a row of seeded random picks per class, white gaps between."""
    rng = np.random.default_rng(seed)
    height, width = images.shape[1:3]
    mosaic = np.full((num_classes * (height + GAP) - GAP, per_class * (width + GAP) - GAP, 3),
                     255, dtype=np.uint8)
    for row in range(num_classes):
        members = np.flatnonzero(labels == row)
        picks = rng.choice(members, size=min(per_class, len(members)), replace=False)
        for column, index in enumerate(picks):
            top, left = row * (height + GAP), column * (width + GAP)
            mosaic[top:top + height, left:left + width] = images[index]
    return mosaic


def _figure(mosaic: np.ndarray, classes: Sequence[str], image_height: int):  # noqa: ANN202
    from matplotlib.figure import Figure

    rows, columns = mosaic.shape[:2]
    figure = Figure(figsize=(columns * SCALE / DPI, rows * SCALE / DPI), dpi=DPI)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.imshow(mosaic, interpolation="nearest")
    centres = [i * (image_height + GAP) + (image_height - 1) / 2 for i in range(len(classes))]
    axes.set_yticks(centres, labels=list(classes), fontsize=11)
    axes.set_xticks([])
    axes.tick_params(axis="y", length=0, pad=6)
    for spine in axes.spines.values():
        spine.set_visible(False)
    return figure
