"""Image files -> top-k classes, from a PyTorch checkpoint (or run folder) or an ONNX file.

``load_classifier`` (from :mod:`cifar_inception.inference`, where the classifiers live)
returns an object with one small interface, shared by ``predict`` and ``serve``, whatever
the model is stored as::

    clf = load_classifier("runs/googlenet")          # or "model.onnx"
    clf.classes                                      # ("airplane", ..., "truck")
    clf.model_name, clf.info                         # "googlenet", {...}
    clf.image_size                                   # 32, or what the model was trained on
    clf.predict_proba(images)                        # uint8 (N, 32, 32, 3) -> float (N, C)

``predict_files`` reads the files (any size and mode, see :mod:`cifar_inception.images`),
resizes them to the classifier's image size, predicts in batches and collects a per-file error instead of stopping at the first bad file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cifar_inception.images import MAX_PIXELS, ImageError, find_images, load_cifar_array
from cifar_inception.inference import (  # noqa: F401  (re-exported: part of this API)
    Classifier,
    TorchClassifier,
    check_finite,
    check_images,
    image_size_for,
    load_classifier,
)

# Files decoded and predicted together: bounds memory for a folder of any size.
FILE_CHUNK = 256


@dataclass
class Prediction:
    """The top classes for one file, or why it could not be read."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path,
                "predictions": [{"class": name, "probability": prob} for name, prob in self.top]}


def top_classes(probs: np.ndarray, classes: Sequence[str],
                k: int) -> list[list[tuple[str, float]]]:
    """Per row, the ``k`` most probable classes, most probable first (ties: class order)."""
    k = max(1, min(k, len(classes)))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(classes[i], float(row[i])) for i in idx] for row, idx in zip(probs, order)]


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def iter_predictions(classifier: Classifier, paths: Iterable[str | os.PathLike], *,
                     top_k: int = 5, max_pixels: int = MAX_PIXELS) -> Iterator[Prediction]:
    """Like :func:`predict_files`, but yields results chunk by chunk, in input order."""
    files = find_images(list(paths))
    size = image_size_for(classifier)
    for chunk in _chunks(files, FILE_CHUNK):
        results = [Prediction(path=str(p)) for p in chunk]
        arrays, readable = [], []
        for result, file in zip(results, chunk):
            try:
                arrays.append(load_cifar_array(file, max_pixels=max_pixels, size=size))
                readable.append(result)
            except ImageError as exc:
                result.error = str(exc)
            except (OSError, ValueError) as exc:  # e.g. a mode Pillow cannot turn into RGB
                result.error = f"{file}: cannot convert to RGB ({exc})"
        if arrays:
            probs = classifier.predict_proba(np.stack(arrays))
            tops = top_classes(probs, classifier.classes, top_k)
            for result, top in zip(readable, tops):
                result.top = top
        yield from results


def predict_files(classifier: Classifier, paths: Iterable[str | os.PathLike], top_k: int = 5,
                  *, max_pixels: int = MAX_PIXELS) -> list[Prediction]:
    """Files and folders (walked recursively) -> one :class:`Prediction` per image file.

    A file that cannot be read (missing, corrupt, not an image, a decompression bomb) gets
    its ``error`` set; the other files are still predicted.
    """
    return list(iter_predictions(classifier, paths, top_k=top_k, max_pixels=max_pixels))


def is_model_path(path: str | os.PathLike) -> bool:
    """Whether ``predict``'s first argument names the model: a run folder (it holds best.pt,
    last.pt or config.json), or any file that is not an image (.pt, .onnx, or a file that
    will then be refused as no checkpoint). Image files and folders of images are not."""
    from cifar_inception.images import IMAGE_SUFFIXES
    from cifar_inception.runs import BEST, CONFIG_FILE, LAST

    path = Path(path)
    if path.is_dir():
        return any((path / name).exists() for name in (BEST, LAST, CONFIG_FILE))
    return path.suffix.lower() not in IMAGE_SUFFIXES


def _lone_argument_problem(argument: str) -> str:
    """Why a lone argument that is no image cannot be predicted: it is a model with no images
    after it, or a file of a kind that is neither."""
    from cifar_inception.images import IMAGE_SUFFIXES
    from cifar_inception.pretrained import CHECKPOINT_SUFFIXES

    path = Path(argument)
    if path.is_dir() or path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return f"{argument} is a model; give the images to classify after it"
    return (f"{argument}: not an image of a kind this reads ({', '.join(IMAGE_SUFFIXES)}) "
            f"nor a model (a run folder, {', '.join(CHECKPOINT_SUFFIXES)})")


def split_model_argument(arguments: Sequence[str], *,
                         weights_given: bool) -> tuple[str | None, list[str]]:
    """``predict [CHECKPOINT] IMAGE...``: the model path, if the first argument is one, and
    the images. With ``--weights`` every argument is an image."""
    from cifar_inception.errors import CifarInceptionError

    if weights_given or not is_model_path(arguments[0]):
        return None, list(arguments)
    if len(arguments) == 1:
        raise CifarInceptionError(_lone_argument_problem(arguments[0]))
    return arguments[0], list(arguments[1:])
