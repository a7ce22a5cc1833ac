"""Image files -> top-k classes, from a PyTorch checkpoint (or run folder) or an ONNX file.

``load_classifier`` returns an object with one small interface, shared by ``predict`` and
``serve``, whatever the model is stored as::

    clf = load_classifier("runs/googlenet")          # or "model.onnx"
    clf.classes                                      # ("airplane", ..., "truck")
    clf.model_name, clf.info                         # "googlenet", {...}
    clf.predict_proba(images)                        # uint8 (N, 32, 32, 3) -> float (N, C)

``predict_files`` reads the files (any size and mode, see :mod:`cifar_inception.images`),
predicts in batches and collects a per-file error instead of stopping at the first bad file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cifar_inception.errors import CifarInceptionError, needs_extra
from cifar_inception.images import MAX_PIXELS, ImageError, find_images, load_cifar_array

# Files decoded and predicted together: bounds memory for a folder of any size.
FILE_CHUNK = 256


@runtime_checkable
class Classifier(Protocol):
    """What ``predict`` and ``serve`` need from a trained model, however it is stored."""

    classes: tuple[str, ...]
    model_name: str
    info: dict[str, Any]

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, 32, 32, 3) RGB -> class probabilities, float (N, len(classes))."""
        ...


def check_images(images: np.ndarray) -> np.ndarray:
    """Accept a single image or a batch of 32x32 RGB uint8 images; return a batch."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
        raise CifarInceptionError(
            f"expected uint8 images of shape (N, 32, 32, 3), got {images.dtype} {images.shape}")
    return images


def check_finite(outputs: np.ndarray, source: str) -> np.ndarray:
    """Refuse NaN or infinite model outputs, which would otherwise print as predictions."""
    if not np.isfinite(outputs).all():
        raise CifarInceptionError(f"{source}: the model gives NaN or infinite outputs; "
                                  "its weights are unusable (a diverged run?)")
    return outputs


class TorchClassifier:
    """A trained PyTorch model with the normalisation and class names of its checkpoint."""

    def __init__(self, model, checkpoint: dict, *, source: str = "", device: str | None = None,
                 batch_size: int = 256):
        from cifar_inception.devices import pick_device

        self.device = pick_device(device or "auto")
        self.model = model.to(self.device).eval()
        self.checkpoint_info = checkpoint["model"]
        self.mean = checkpoint["data"]["mean"]
        self.std = checkpoint["data"]["std"]
        self.classes = tuple(checkpoint["data"]["classes"])
        self.model_name = checkpoint["model"]["name"]
        self.batch_size = batch_size
        self.info = {
            "model": self.model_name,
            "options": dict(checkpoint["model"]["options"]),
            "num_classes": checkpoint["model"]["num_classes"],
            "params": sum(p.numel() for p in model.parameters()),
            "metrics": dict(checkpoint.get("metrics") or {}),
            "format": "pytorch",
            "source": source,
        }

    @classmethod
    def from_path(cls, path: str | os.PathLike, *, device: str | None = None) -> TorchClassifier:
        """A checkpoint file or a run folder (its best.pt, else last.pt), loaded weights-only."""
        from cifar_inception.checkpoint import load_trained_model, resolve_checkpoint

        model, ckpt = load_trained_model(path)
        return cls(model, ckpt, source=str(resolve_checkpoint(path)), device=device)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        import torch

        from cifar_inception.augment import normalize

        images = check_images(images)
        out = np.empty((len(images), len(self.classes)), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = torch.tensor(images[start:start + self.batch_size], device=self.device)
                logits = self.model(normalize(batch, self.mean, self.std))
                probs = torch.softmax(logits.float(), dim=1)
                out[start:start + len(batch)] = probs.cpu().numpy()
        return check_finite(out, self.info["source"] or self.model_name)


def load_classifier(path: str | os.PathLike, *, device: str | None = None) -> Classifier:
    """An ``.onnx`` file -> ONNX Runtime; anything else -> a PyTorch checkpoint or run folder.

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``...) applies to PyTorch checkpoints;
    None means ``auto``: the GPU when there is one.
    """
    if Path(path).suffix.lower() == ".onnx":
        # onnxruntime is an optional dependency: imported only for .onnx files
        with needs_extra("export", f"{path}: reading ONNX files"):
            import onnxruntime  # noqa: F401
        from cifar_inception.export import OnnxClassifier

        return OnnxClassifier(path)
    return TorchClassifier.from_path(path, device=device)


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
    for chunk in _chunks(files, FILE_CHUNK):
        results = [Prediction(path=str(p)) for p in chunk]
        arrays, readable = [], []
        for result, file in zip(results, chunk):
            try:
                arrays.append(load_cifar_array(file, max_pixels=max_pixels))
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
