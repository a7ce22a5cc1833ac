"""Test-set evaluation: top-1 and top-5 accuracy, loss, per-class accuracy, confusion matrix.

Metric names are exact: ``test_loss`` is the mean cross-entropy (natural log) of the main
head, ``test_top1``/``test_top5`` are accuracies as fractions in [0, 1].

Test-time augmentation (``tta=True``) classifies six views of every image (the image and
its mirror, each unshifted and shifted by 2 pixels up-left and down-right with reflect
padding), or with ``tta_views=2`` only the image and its mirror, and averages their softmax
*probabilities*; the loss is then the cross-entropy of that averaged distribution.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cifar_inception.augment import flip_where, normalize, translate
from cifar_inception.checkpoint import (
    check_compatible,
    check_run_matches,
    image_size_of,
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint,
)
from cifar_inception.devices import pick_device
from cifar_inception.errors import CheckpointError, CifarInceptionError
from cifar_inception.fileio import atomic_write_json
from cifar_inception.runs import EVAL_FILE  # noqa: F401  (training imports it from here)
from cifar_inception.runs import RunFolder

TTA_SHIFT = 2
# (mirror, dy, dx) of each test-time view
TTA_VIEWS = tuple((flip, d, d) for flip in (False, True) for d in (0, -TTA_SHIFT, TTA_SHIFT))
# The mirror gives most of the gain for a third of the cost: measured on a 4-epoch
# inception-cpu (JPEG copy), 81.18% with one view, 82.20% with two, 82.26% with six.
VIEWS_BY_COUNT = {1: ((False, 0, 0),), 2: ((False, 0, 0), (True, 0, 0)), 6: TTA_VIEWS}
TTA_VIEW_COUNTS = (2, 6)


TOP_K = 5  # the top-k accuracy reported beside top-1, where there are more classes

def views_for(tta: bool, tta_views: int = len(TTA_VIEWS)) -> tuple[tuple[bool, int, int], ...]:
    """The (mirror, dy, dx) views a test classifies: one without ``tta``, else ``tta_views``."""
    if not tta:
        return VIEWS_BY_COUNT[1]
    if tta_views not in TTA_VIEW_COUNTS:
        raise CifarInceptionError(f"test-time augmentation takes 2 or 6 views, not {tta_views!r}")
    return VIEWS_BY_COUNT[tta_views]


def _view(images: torch.Tensor, flip: bool, dy: int, dx: int) -> torch.Tensor:
    n = images.shape[0]
    if dy or dx:
        shift = torch.full((n,), dy, dtype=torch.long, device=images.device)
        images = translate(images, shift, torch.full_like(shift, dx))
    if flip:
        images = flip_where(images, torch.ones(n, dtype=torch.bool, device=images.device))
    return images


@torch.no_grad()
def log_probabilities(model: torch.nn.Module, images: torch.Tensor, mean: Sequence[float],
                      std: Sequence[float], *, batch_size: int = 1000,
                      device: torch.device | str = "cpu", tta: bool = False,
                      tta_views: int = len(TTA_VIEWS),
                      channels_last: bool = False) -> torch.Tensor:
    """Log-probabilities (N, C), float32 on the CPU, for uint8 (N, S, S, 3) images.

    ``model`` must already be on ``device`` and in eval mode; ``images`` may be anywhere (each
    batch is moved to ``device``). With ``tta`` the probabilities of the views are averaged.
    """
    device = torch.device(device)
    views = views_for(tta, tta_views)
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        per_view = []
        for flip, dy, dx in views:
            x = normalize(_view(batch, flip, dy, dx), mean, std, channels_last=channels_last)
            per_view.append(F.log_softmax(model(x).float(), dim=1))
        stacked = torch.stack(per_view)
        # log of the mean probability, computed stably
        outputs.append((torch.logsumexp(stacked, dim=0) - math.log(len(views))).cpu())
    if not outputs:
        raise CifarInceptionError("no images to evaluate")
    return torch.cat(outputs)


def classification_metrics(log_probs: torch.Tensor, labels: torch.Tensor,
                           classes: Sequence[str]) -> dict[str, Any]:
    """Loss, top-1, top-5, per-class accuracy and the confusion matrix (rows = true class).

    Top-5 is given only where there are more than 5 classes: with 5 or fewer it is 100%.
    """
    labels = labels.to(torch.long).cpu()
    num_classes = len(classes)
    k = min(TOP_K, num_classes)
    top = log_probs.topk(k, dim=1).indices
    predicted = top[:, 0]
    confusion = torch.bincount(labels * num_classes + predicted,
                               minlength=num_classes * num_classes).view(num_classes, num_classes)
    per_class_total = confusion.sum(1)
    per_class = {
        name: (float(confusion[i, i]) / float(per_class_total[i]) if per_class_total[i] else None)
        for i, name in enumerate(classes)
    }
    metrics = {
        "test_loss": float(F.nll_loss(log_probs, labels)),
        "test_top1": float((predicted == labels).float().mean()),
    }
    if num_classes > TOP_K:
        metrics["test_top5"] = float((top == labels[:, None]).any(1).float().mean())
    return {**metrics, "per_class": per_class, "confusion": confusion.tolist()}


def accuracy_line(metrics: dict) -> str:
    """'top-1 93.10% - top-5 99.80%', without top-5 where there are 5 classes or fewer."""
    line = f"top-1 {100 * metrics['test_top1']:.2f}%"
    if metrics.get("test_top5") is not None:
        line += f" - top-5 {100 * metrics['test_top5']:.2f}%"
    return line


def most_confused(confusion: Sequence[Sequence[int]], classes: Sequence[str],
                  count: int = 10) -> list[tuple[str, str, int]]:
    """The ``count`` largest off-diagonal cells: (true class, predicted class, images)."""
    cells = [(n, classes[i], classes[j]) for i, row in enumerate(confusion)
             for j, n in enumerate(row) if i != j and n > 0]
    cells.sort(key=lambda cell: -cell[0])
    return [(true, predicted, n) for n, true, predicted in cells[:count]]


def _check_classes(ckpt: dict, classes: Sequence[str], where: str) -> None:
    check_compatible(ckpt, num_classes=len(classes), where=where)
    if list(ckpt["data"]["classes"]) != list(classes):
        raise CheckpointError(
            f"{where} was trained on classes {ckpt['data']['classes']}, "
            f"but the data has {list(classes)}")


def _check_image_size(ckpt: dict, images: Any, where: str) -> None:
    """Refuse test images of another size than the checkpoint's model was trained on."""
    size = image_size_of(ckpt)
    found = tuple(images.shape[1:])
    if found != (size, size, 3):
        raise CheckpointError(f"{where} was trained on {size}x{size} images, but the test "
                              f"images are {found}; load the data with image_size={size}")


def test_in_channels_last(device: torch.device) -> bool:
    """The CPU's convolution kernels (oneDNN) run fp32 about 1.6x as fast on channels-last
    tensors, on AVX2 and AVX-512 alike (benchmarks/throughput.py); the results are the same."""
    return device.type == "cpu"


def evaluate(checkpoint_or_run: str | os.PathLike, data: Any = None, *, tta: bool = False,
             tta_views: int = len(TTA_VIEWS), device: str = "auto", batch_size: int = 1000,
             data_dir: str | None = None, download: bool = True,
             write: bool = True) -> dict[str, Any]:
    """Evaluate a checkpoint (or a run folder's best.pt) on the test set it was trained for.

    ``data`` is a loaded ``Dataset``; when None the checkpoint's dataset is loaded, at the
    image size it was trained on, from ``data_dir``, else from the folder the run was
    trained on (as the report finds it: :func:`runs.recorded_data_dir`), else from the
    default location. Writes ``eval.json`` next to the checkpoint unless
    ``write`` is False. ``tta``: test-time augmentation, with ``tta_views`` views (2 or 6).
    Returns the metrics dict.
    """
    if batch_size < 1:
        raise CifarInceptionError(f"batch size must be >= 1, not {batch_size}")
    path = resolve_checkpoint(checkpoint_or_run)
    run = RunFolder.holding(path)
    ckpt = load_checkpoint(path)
    check_run_matches(ckpt, path)
    if data is None:
        from cifar_inception.data import load_dataset, trained_dataset

        data = load_dataset(trained_dataset(ckpt), data_dir or run.recorded_data_dir(ckpt),
                            image_size=image_size_of(ckpt), download=download)
    _check_classes(ckpt, data.classes, str(path))
    _check_image_size(ckpt, data.test_images, str(path))
    torch_device = pick_device(device)
    model = model_from_checkpoint(ckpt, where=str(path)).to(torch_device)
    channels_last = test_in_channels_last(torch_device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = torch.as_tensor(data.test_images)
    labels = torch.as_tensor(data.test_labels)
    log_probs = log_probabilities(model, images, ckpt["data"]["mean"], ckpt["data"]["std"],
                                  batch_size=batch_size, device=torch_device, tta=tta,
                                  tta_views=tta_views,
                                  channels_last=channels_last)
    result = classification_metrics(log_probs, labels, data.classes)
    if not math.isfinite(result["test_loss"]):
        # A NaN loss beside plausible accuracies would be recorded as if it meant something.
        raise CifarInceptionError(
            f"{path}: the model's outputs on the test set are NaN or infinite (test loss "
            f"{result['test_loss']}); nothing written")
    result.update(tta=tta, views=len(views_for(tta, tta_views)),
                  num_images=int(labels.shape[0]), checkpoint=str(path))
    if write:
        atomic_write_json(run.eval_file_for(path), result)
    return result
