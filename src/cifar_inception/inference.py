"""Trained models behind one small interface, from a PyTorch checkpoint or an exported ONNX file.

``load_classifier`` returns an object with one small interface, shared by ``predict`` and
``serve``, whatever the model is stored as::

    clf = load_classifier("runs/googlenet")          # or "model.onnx"
    clf.classes                                      # ("airplane", ..., "truck")
    clf.model_name, clf.info                         # "googlenet", {...}
    clf.image_size                                   # 32: the side of the images it takes
    clf.predict_proba(images)                        # uint8 (N, 32, 32, 3) -> float (N, C)

The image size is the one the model was trained on (``train --image-size``), read from the
checkpoint or from the exported file's input, so no user of a classifier names it.

:class:`TorchClassifier` runs a checkpoint with PyTorch; :class:`OnnxClassifier` runs a file
written by :mod:`cifar_inception.export` with ONNX Runtime alone. Both check their input
with :func:`check_images`, predict in batches with :func:`predict_in_batches` and describe
themselves with :func:`classifier_info`. This module imports torch only inside
:class:`TorchClassifier`, so the ONNX path stays free of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cifar_inception.data.specs import (
    DEFAULT_IMAGE_SIZE,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
)
from cifar_inception.errors import CheckpointError, CifarInceptionError, needs_extra
from cifar_inception.fileio import json_safe
from cifar_inception.runs import RunFolder, eval_is_for

# The interface of an exported file (see :mod:`cifar_inception.export`).
EXPORT_FORMAT = "cifar-inception-export/1"
# Metadata values that are JSON; the others are plain strings (readable in any ONNX viewer).
JSON_KEYS = ("options", "num_classes", "classes", "mean", "std", "params", "metrics",
             "image_size")
# The longest JSON value read (1,000 class names take some 30 KB): a value nested 100,000
# deep would exhaust the parser's recursion, a huge one the memory.
MAX_METADATA_CHARS = 1 << 20
# The type each of those values must have, as the rest of the package uses them: a string
# for "params" would break every formatted print of it.
METADATA_TYPES = {
    "options": (dict, "a JSON object"),
    "metrics": (dict, "a JSON object"),
    "params": ((int, type(None)), "a whole number"),
    "num_classes": (int, "a whole number"),
    "image_size": (int, "a whole number"),
    "mean": (list, "a list of 3 numbers"),
    "std": (list, "a list of 3 numbers"),
}
INPUT_NAME = "images"
INPUT_TYPE = "tensor(uint8)"
OUTPUT_NAMES = ("logits", "probabilities")


@runtime_checkable
class Classifier(Protocol):
    """What ``predict`` and ``serve`` need from a trained model, however it is stored."""

    classes: tuple[str, ...]
    model_name: str
    info: dict[str, Any]
    image_size: int

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) RGB, S = ``image_size`` -> class probabilities, float
        (N, len(classes))."""
        ...


def input_shape(image_size: int) -> tuple[int, int, int]:
    """One image as a classifier takes it, after the batch dimension (which stays dynamic)."""
    return (image_size, image_size, 3)


def image_size_for(classifier: Any) -> int:
    """The side of the images ``classifier`` takes; one that does not say (written before
    image sizes) takes CIFAR's 32x32."""
    return getattr(classifier, "image_size", DEFAULT_IMAGE_SIZE)


def check_images(images: np.ndarray, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """Accept a single image or a batch of ``image_size`` square RGB uint8 images; return a
    batch."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1:] != input_shape(image_size) \
            or images.dtype != np.uint8:
        raise CifarInceptionError(f"expected uint8 images of shape (N, {image_size}, "
                                  f"{image_size}, 3), got {images.dtype} {images.shape}")
    return images


def check_finite(outputs: np.ndarray, source: str) -> np.ndarray:
    """Refuse NaN or infinite model outputs, which would otherwise print as predictions."""
    if not np.isfinite(outputs).all():
        raise CifarInceptionError(f"{source}: the model gives NaN or infinite outputs; "
                                  "its weights are unusable (a diverged run?)")
    return outputs


def predict_in_batches(run_batch: Callable[[np.ndarray], Any], images: np.ndarray, *,
                       num_classes: int, batch_size: int, source: str,
                       image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """Checked images -> float32 (N, num_classes), ``batch_size`` images per ``run_batch``.

    ``run_batch`` gets a C-contiguous uint8 (n, S, S, 3) slice, S = ``image_size``, and
    returns (n, num_classes); outputs that are not finite are refused, naming ``source``.
    """
    images = np.ascontiguousarray(check_images(images, image_size))
    out = np.empty((len(images), num_classes), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        result = np.asarray(run_batch(batch))
        if result.shape != (len(batch), num_classes):  # a file's graph may answer anything
            raise CheckpointError(f"{source}: the model answers {len(batch)} images with an "
                                  f"array of shape {result.shape}, not ({len(batch)}, "
                                  f"{num_classes})")
        out[start:start + len(batch)] = result
    return check_finite(out, source)


def classifier_info(model_name: str, *, options: Any, num_classes: int, params: int | None,
                    metrics: Any, fmt: str, source: str, dataset: str | None = None,
                    image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, Any]:
    """The ``info`` of a classifier: what ``predict --json`` prints and ``serve`` describes.

    Options and metrics come from the file and may hold NaN or tensors: made JSON-safe here,
    once, so that every JSON output built from them is valid."""
    return {
        "model": model_name,
        "options": json_safe(options),
        "num_classes": num_classes,
        "dataset": dataset if isinstance(dataset, str) else None,
        "image_size": image_size,
        "params": params,
        "metrics": json_safe(metrics),
        "format": fmt,
        "source": source,
    }


def checkpoint_test_metrics(evaluation: dict | None, checkpoint: Path) -> dict[str, float]:
    """test_top1/test_top5 of a run's eval.json (as :func:`cifar_inception.runs.read_eval`
    returns it), when it evaluated this checkpoint (not, say, the run's last.pt); else nothing."""
    if evaluation is not None and not eval_is_for(evaluation, checkpoint):
        return {}
    return _test_accuracies(evaluation)


def run_test_metrics(checkpoint: Path) -> dict[str, float]:
    """test_top1/test_top5 from the eval.json beside the checkpoint, when it evaluated it."""
    return _test_accuracies(RunFolder.holding(checkpoint).eval_for(checkpoint))


def _test_accuracies(evaluation: dict | None) -> dict[str, float]:
    if evaluation is None:
        return {}
    return {key: evaluation[key] for key in ("test_top1", "test_top5")
            if isinstance(evaluation.get(key), (int, float))}


# ---------------------------------------------------------------------------------------------
# PyTorch


class TorchClassifier:
    """A trained PyTorch model with the normalisation and class names of its checkpoint."""

    def __init__(self, model, checkpoint: dict, *, source: str = "", device: str | None = None,
                 batch_size: int = 256):
        from cifar_inception.checkpoint import image_size_of
        from cifar_inception.devices import pick_device

        self.device = pick_device(device or "auto")
        self.model = model.to(self.device).eval()
        self.checkpoint_info = checkpoint["model"]
        self.mean = checkpoint["data"]["mean"]
        self.std = checkpoint["data"]["std"]
        self.classes = tuple(checkpoint["data"]["classes"])
        self.model_name = checkpoint["model"]["name"]
        self.image_size = image_size_of(checkpoint)
        self.batch_size = batch_size
        self.info = classifier_info(
            self.model_name,
            options=dict(checkpoint["model"]["options"]),
            num_classes=checkpoint["model"]["num_classes"],
            dataset=checkpoint["data"].get("dataset", "cifar10"),
            image_size=self.image_size,
            params=sum(p.numel() for p in model.parameters()),
            metrics=dict(checkpoint.get("metrics") or {}),
            fmt="pytorch",
            source=source,
        )

    @classmethod
    def from_path(cls, path: str | os.PathLike, *, device: str | None = None) -> TorchClassifier:
        """A checkpoint file or a run folder (its best.pt, else last.pt), loaded weights-only."""
        from cifar_inception.checkpoint import load_trained_model, resolve_checkpoint

        model, ckpt = load_trained_model(path)
        return cls(model, ckpt, source=str(resolve_checkpoint(path)), device=device)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        import torch

        from cifar_inception.augment import normalize

        def run_batch(batch: np.ndarray) -> np.ndarray:
            logits = self.model(normalize(torch.tensor(batch, device=self.device),
                                          self.mean, self.std))
            return torch.softmax(logits.float(), dim=1).cpu().numpy()

        with torch.inference_mode():
            return predict_in_batches(run_batch, images, num_classes=len(self.classes),
                                      batch_size=self.batch_size,
                                      source=self.info["source"] or self.model_name,
                                      image_size=self.image_size)

    def log_probabilities(self, images):
        """uint8 (N, S, S, 3) images, a tensor -> log-probabilities (N, C), a float32 tensor
        on the CPU, as ``evaluate`` computes them without TTA."""
        from cifar_inception.evaluation import log_probabilities

        return log_probabilities(self.model, images, self.mean, self.std, device=self.device)


# ---------------------------------------------------------------------------------------------
# ONNX Runtime only


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (ONNX Runtime's run to many), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def read_onnx_metadata(metadata_props: dict[str, str], *, where: str) -> dict[str, Any]:
    """Decode the metadata an export wrote; refuse files that do not carry it."""
    if metadata_props.get("format") != EXPORT_FORMAT:
        raise CheckpointError(
            f"{where}: not an ONNX file exported by cifar-inception "
            f"(no '{EXPORT_FORMAT}' metadata)")
    meta: dict[str, Any] = dict(metadata_props)
    for key in JSON_KEYS:
        if key in meta:
            if len(meta[key]) > MAX_METADATA_CHARS:
                raise CheckpointError(f"{where}: its metadata '{key}' is over "
                                      f"{MAX_METADATA_CHARS:,} characters")
            try:
                meta[key] = json.loads(meta[key])
            except (ValueError, RecursionError):  # RecursionError: '[' nested 100,000 deep
                raise CheckpointError(f"{where}: its metadata '{key}' is not valid JSON") from None
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{where}: its metadata has no valid class names")
    for key, (kinds, meaning) in METADATA_TYPES.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise CheckpointError(f"{where}: its metadata '{key}' must be {meaning}, "
                                  f"not {type(value).__name__} {str(value)[:60]!r}")
    if meta.get("params") is not None and meta["params"] < 0:
        raise CheckpointError(f"{where}: its metadata 'params' is negative")
    return meta


class OnnxClassifier:
    """An exported ONNX file run by ONNX Runtime: the classifier interface of ``predict``.

    ``classes``, ``model_name``, ``info``, ``image_size`` (the side of its input, from the
    file's input shape) and ``predict_proba(uint8 (N, S, S, 3))``, as
    :class:`TorchClassifier`. PyTorch is not imported.
    """

    def __init__(self, path: str | os.PathLike, *, providers: list[str] | None = None,
                 batch_size: int = 256, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            what = "not a regular file" if self.path.exists() else "no such ONNX file"
            raise CheckpointError(f"{self.path}: {what}")
        options = ort.SessionOptions()
        # Errors only: a file's odd graph makes ONNX Runtime print coloured warnings on
        # stderr, beside the one line this package says about it.
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options,
                providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own, undocumented exception types
            raise CheckpointError(
                f"{self.path}: not a readable ONNX model ({first_line(exc)})") from None
        meta = read_onnx_metadata(self.session.get_modelmeta().custom_metadata_map,
                                  where=str(self.path))
        self.image_size = self._check_signature(len(meta["classes"]))
        if meta.get("image_size", self.image_size) != self.image_size:
            raise CheckpointError(f"{self.path}: its input takes {self.image_size}x"
                                  f"{self.image_size} images, but its metadata says "
                                  f"{meta['image_size']}")
        self.metadata = meta
        self.classes = tuple(meta["classes"])
        self.model_name = str(meta.get("model", ""))
        self.batch_size = batch_size
        self.info = classifier_info(
            self.model_name,
            options=meta.get("options", {}),
            num_classes=len(self.classes),
            dataset=meta.get("dataset"),
            image_size=self.image_size,
            params=meta.get("params"),
            metrics=meta.get("metrics", {}),
            fmt="onnx",
            source=str(self.path),
        )

    def _check_signature(self, num_classes: int) -> int:
        """The interface :func:`cifar_inception.export.export_model` writes (anything else
        would fail at run time with ONNX Runtime's own traceback); the side of its images."""
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if inputs != [INPUT_NAME] or not set(OUTPUT_NAMES) <= outputs.keys():
            raise CheckpointError(f"{self.path}: expected input '{INPUT_NAME}' and outputs "
                                  f"{', '.join(OUTPUT_NAMES)}; found {inputs}, {list(outputs)}")
        found = self.session.get_inputs()[0]
        shape = list(found.shape or [])
        batch_fixed = bool(shape) and isinstance(shape[0], int)
        side = shape[1] if len(shape) == 4 else None
        square = isinstance(side, int) and MIN_IMAGE_SIZE <= side <= MAX_IMAGE_SIZE \
            and tuple(shape[1:]) == input_shape(side)
        if found.type != INPUT_TYPE or not square or batch_fixed:
            raise CheckpointError(
                f"{self.path}: its input is {found.type} {shape}, not the uint8 "
                f"[N, S, S, 3] (any N, an image side S, channels last) that cifar-inception "
                f"exports")
        declared = outputs[OUTPUT_NAMES[1]]
        if declared is not None and len(declared) != 2:
            raise CheckpointError(f"{self.path}: its output '{OUTPUT_NAMES[1]}' has the shape "
                                  f"{declared}, not [N, classes]")
        width = declared[-1] if declared else None
        if isinstance(width, int) and width != num_classes:
            raise CheckpointError(f"{self.path}: the model has {width} outputs but its "
                                  f"metadata names {num_classes} classes")
        return side

    def _run(self, output: str, images: np.ndarray) -> np.ndarray:
        def run_batch(batch: np.ndarray) -> np.ndarray:
            try:
                return self.session.run([output], {INPUT_NAME: batch})[0]
            except Exception as exc:  # ONNX Runtime raises its own, undocumented types
                raise CheckpointError(f"{self.path}: the model fails when run "
                                      f"({first_line(exc)})") from None

        return predict_in_batches(run_batch, images, num_classes=len(self.classes),
                                  batch_size=self.batch_size, source=str(self.path),
                                  image_size=self.image_size)

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> logits, float32 (N, C)."""
        return self._run(OUTPUT_NAMES[0], images)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> probabilities, float32 (N, C)."""
        return self._run(OUTPUT_NAMES[1], images)


# ---------------------------------------------------------------------------------------------
# Either


def load_classifier(path: str | os.PathLike, *, device: str | None = None) -> Classifier:
    """An ``.onnx`` file -> ONNX Runtime; anything else -> a PyTorch checkpoint or run folder.

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``...) applies to PyTorch checkpoints;
    None means ``auto``: the GPU when there is one.
    """
    if Path(path).suffix.lower() == ".onnx":
        # onnxruntime is an optional dependency: imported only for .onnx files
        with needs_extra("export", f"{path}: reading ONNX files"):
            import onnxruntime  # noqa: F401  (present, or the one line above)
        return OnnxClassifier(path)
    return TorchClassifier.from_path(path, device=device)
