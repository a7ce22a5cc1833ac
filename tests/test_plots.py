"""cifar_inception.plots: the labelled class grid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cifar_inception.errors import CifarInceptionError
from cifar_inception.plots import class_grid

NAMES = ("red", "green", "blue", "yellow")
COLOURS = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], dtype=np.uint8)


def coloured_images(per_class: int):
    """Images filled with their class's colour and marked with their index in one corner, so
    that different picks give different pictures."""
    labels = np.repeat(np.arange(len(NAMES)), per_class)
    images = np.empty((len(labels), 32, 32, 3), np.uint8)
    images[:] = COLOURS[labels][:, None, None, :]
    images[:, :8, :8] = np.arange(len(labels), dtype=np.uint8)[:, None, None, None] * 7
    return images, labels


def test_rows_follow_the_classes(tmp_path):
    images, labels = coloured_images(per_class=6)
    path = class_grid(images, labels, NAMES, tmp_path / "grid.png", per_class=5)
    with Image.open(path) as image:
        picture = np.asarray(image.convert("RGB"))
    centres = []
    for colour in COLOURS:
        rows = np.flatnonzero(np.all(picture == colour, axis=-1).any(axis=1))
        assert rows.size, f"colour {colour} missing"
        centres.append(rows.mean())
        # Five images side by side: the colour spans most of the width of its row.
        columns = np.flatnonzero(np.all(picture == colour, axis=-1).any(axis=0))
        assert columns.max() - columns.min() > picture.shape[1] * 0.6
    assert centres == sorted(centres)  # first class on top
    assert picture.shape[1] > picture.shape[0]  # 5 columns, 4 rows, labels on the left


def test_grid_is_seeded(tmp_path):
    images, labels = coloured_images(per_class=20)
    first = class_grid(images, labels, NAMES, tmp_path / "a.png", per_class=3, seed=1)
    again = class_grid(images, labels, NAMES, tmp_path / "b.png", per_class=3, seed=1)
    other = class_grid(images, labels, NAMES, tmp_path / "c.png", per_class=3, seed=2)
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other.read_bytes()


def test_class_with_fewer_images_than_asked(tmp_path):
    images, labels = coloured_images(per_class=2)
    path = class_grid(images, labels, NAMES, tmp_path / "grid.png", per_class=10)
    with Image.open(path) as image:
        assert image.size[0] > 0


def test_other_formats_by_suffix(tmp_path):
    images, labels = coloured_images(per_class=2)
    path = class_grid(images, labels, NAMES, tmp_path / "grid.svg", per_class=2)
    assert path.read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize("images, labels, path", [
    (np.zeros((4, 32, 32, 3), np.float32), np.arange(4), "g.png"),
    (np.zeros((4, 32, 32, 3), np.uint8), np.arange(3), "g.png"),
    (np.zeros((4, 32, 32, 3), np.uint8), np.arange(4), "g.unknown"),
    (np.zeros((4, 32, 32, 3), np.uint8), np.arange(4), "no-suffix"),
])
def test_bad_input_is_reported(tmp_path, images, labels, path):
    with pytest.raises(CifarInceptionError):
        class_grid(images, labels, NAMES, tmp_path / path)
    assert not (tmp_path / path).exists()
