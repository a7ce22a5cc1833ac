"""The report's first step: read the run folder, load the data it was trained on and
predict the test set once, into one :class:`RunData` that the figures and the page show."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifar_inception.errors import CheckpointError, CifarInceptionError
from cifar_inception.inference import TorchClassifier
from cifar_inception.runs import (
    RunFolder,
    eval_is_for,
    is_evaluation,
    read_json_object,
    recorded_data_dir,
)


@dataclass
class RunData:
    """Everything the report shows, gathered from the run folder, the data and the model."""

    run: Path
    checkpoint: Path
    classes: tuple[str, ...]
    config: dict
    metrics: list[dict]
    evaluation: dict
    evaluation_source: str
    model_info: dict
    image_size: int = 32                # the side of the images the model takes
    data_source: str = ""
    test_images: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    test_probs: np.ndarray | None = None
    train_images: np.ndarray | None = None
    train_labels: np.ndarray | None = None


def predict_test_set(classifier: TorchClassifier, images: np.ndarray, *, progress: bool,
                     chunk: int = 1000):
    """Log-probabilities of every test image, as ``evaluate`` computes them, with a bar."""
    import torch
    from tqdm import tqdm

    parts = []
    with tqdm(total=len(images), desc="predicting the test set", unit="img", leave=False,
              disable=not progress) as bar:
        for start in range(0, len(images), chunk):
            batch = torch.as_tensor(images[start:start + chunk])
            parts.append(classifier.log_probabilities(batch))
            bar.update(len(batch))
    return torch.cat(parts)


def saved_evaluation(path: Path, checkpoint: Path, num_images: int,
                     num_classes: int) -> tuple[dict | None, str]:
    """eval.json when it describes this checkpoint on this test set; else None and why not."""
    if not path.is_file():
        return None, "computed for this report (the run has no eval.json)"
    try:
        evaluation = read_json_object(path)
    except CifarInceptionError as exc:
        return None, f"computed for this report ({exc})"
    if not is_evaluation(evaluation):
        return None, "computed for this report (eval.json is damaged)"
    if evaluation.get("num_images") != num_images:
        return None, (f"computed for this report (eval.json is for {evaluation.get('num_images')} "
                      f"test images, this data has {num_images:,})")
    confusion = evaluation.get("confusion")
    if not (isinstance(confusion, list) and len(confusion) == num_classes
            and all(len(row) == num_classes for row in confusion)
            and sum(map(sum, confusion)) == num_images):
        return None, ("computed for this report (eval.json's confusion matrix is not one of "
                      f"{num_classes} classes and {num_images:,} images)")
    if not eval_is_for(evaluation, checkpoint):
        return None, (f"computed for this report (eval.json is for "
                      f"{Path(str(evaluation['checkpoint'])).name}, "
                      f"this report for {checkpoint.name})")
    return evaluation, path.name


def gather(run: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
           download: bool = True, progress: bool = False,
           device: str | None = None) -> RunData:
    """Read the run folder, load the data it was trained on and predict the test set once.

    The test-set probabilities feed the misclassified-images figure and, when the run has no
    eval.json for this checkpoint and test set, the metrics, which are then computed as
    ``evaluate`` does (without TTA).
    """
    import torch

    from cifar_inception.checkpoint import (
        check_run_matches,
        image_size_of,
        load_trained_model,
        resolve_checkpoint,
    )
    from cifar_inception.data import load_dataset, trained_dataset
    from cifar_inception.evaluation import classification_metrics

    run = Path(run)
    if not run.is_dir():
        raise CifarInceptionError(f"{run}: not a run folder (a report needs the folder that "
                                  "train wrote, with its metrics and configuration)")
    folder = RunFolder(run)
    checkpoint = resolve_checkpoint(run)
    config = folder.read_config()
    metrics = folder.read_history()
    model, ckpt = load_trained_model(checkpoint)
    check_run_matches(ckpt, checkpoint)  # else one run's curves beside another's results
    if data_dir is None:
        data_dir = recorded_data_dir(config, ckpt)
    classifier = TorchClassifier(model, ckpt, source=str(checkpoint), device=device)
    data = load_dataset(trained_dataset(ckpt), data_dir, image_size=image_size_of(ckpt),
                        download=download, progress=progress)
    if tuple(data.classes) != classifier.classes:
        raise CheckpointError(
            f"{checkpoint} was trained on classes {', '.join(classifier.classes)}; "
            f"the data has {', '.join(data.classes)}")

    labels = torch.as_tensor(np.asarray(data.test_labels))
    log_probs = predict_test_set(classifier, data.test_images, progress=progress)
    evaluation, evaluation_source = saved_evaluation(folder.eval, checkpoint, len(labels),
                                                     len(data.classes))
    if evaluation is None:
        evaluation = classification_metrics(log_probs, labels, data.classes)
        evaluation.update(tta=False, num_images=len(labels), checkpoint=str(checkpoint))
    return RunData(
        run=run, checkpoint=checkpoint, classes=classifier.classes, config=config,
        metrics=metrics, evaluation=evaluation, evaluation_source=evaluation_source,
        model_info=classifier.info, image_size=image_size_of(ckpt),
        data_source=getattr(data, "source", ""),
        test_images=data.test_images, test_labels=labels.numpy(),
        test_probs=log_probs.exp().numpy(),
        train_images=data.train_images, train_labels=np.asarray(data.train_labels),
    )
