"""Evaluation on hand-made cases whose metrics are known, TTA, refusals, eval.json, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from cifar_inception.checkpoint import make_checkpoint, save_checkpoint
from cifar_inception.cli import main
from cifar_inception.data import CIFAR10
from cifar_inception.errors import CheckpointError, CifarInceptionError
from cifar_inception.evaluation import (
    TTA_VIEWS,
    classification_metrics,
    evaluate,
    log_probabilities,
    views_for,
)
from cifar_inception.models.registry import list_models, register_model

from synthetic_data import CLASSES, write_image_tree

LOOKUP = "test-lookup"
STEP = 25  # pixel value = STEP * code


def table() -> torch.Tensor:
    """Row ``code`` = the logits the lookup model outputs for an image coded ``code``."""
    rows = torch.full((10, 10), -2.0)
    rows[0, 0] = 3.0                                   # code 0: class 0, confidently
    rows[1, 2], rows[1, 3], rows[1, 1] = 3.0, 2.0, 1.0  # code 1: 2 > 3 > 1 > the rest
    rows[2] = torch.arange(10, dtype=torch.float32)     # code 2: 9 > 8 > ... > 0
    for code in range(3, 10):
        rows[code, code] = 1.0
    return rows


class Lookup(nn.Module):
    """Reads the red value of pixel (0, 0) (normalised with mean 0, std 1: value / 255)
    and outputs that code's row of the table: outputs known in advance."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.register_buffer("table", table()[:, :num_classes].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = torch.round(x[:, 0, 0, 0] * 255 / STEP).long().clamp(0, 9)
        return self.table[code]


if LOOKUP not in list_models():
    @register_model(LOOKUP)
    def lookup(num_classes: int = 10) -> Lookup:
        return Lookup(num_classes)


def coded_images(codes, second_half=None) -> np.ndarray:
    """Images filled with STEP * code; optionally the right half with another code."""
    images = np.zeros((len(codes), 32, 32, 3), dtype=np.uint8)
    for i, code in enumerate(codes):
        images[i] = STEP * code
        if second_half is not None:
            images[i, :, 16:] = STEP * second_half[i]
    return images


# labels vs codes: image 0 right, 1 right in top-5 only, 2 wrong even in top-5 (class 2
# ranks 8th in row 2), 3 right.
LABELS = np.array([0, 1, 2, 0])
CODES = [0, 1, 2, 0]


def lookup_data(classes=CLASSES) -> CIFAR10:
    images = coded_images(CODES)
    return CIFAR10(images, LABELS, images, LABELS, tuple(classes), "hand-made", "none")


def every_class_data() -> CIFAR10:
    """The four images above plus one right answer for each of classes 3..9 (an image
    folder tree needs every class): top-1 9/11, top-5 10/11."""
    labels = np.concatenate([LABELS, np.arange(3, 10)])
    images = coded_images([*CODES, *range(3, 10)])
    return CIFAR10(images, labels, images, labels, CLASSES, "hand-made", "none")


def write_lookup_checkpoint(path: Path, *, num_classes=10, classes=CLASSES,
                            name=LOOKUP) -> Path:
    model = Lookup(num_classes)
    ckpt = make_checkpoint(model_name=name, model_options={}, num_classes=num_classes,
                           classes=list(classes), mean=[0, 0, 0], std=[1, 1, 1],
                           state_dict=model.state_dict())
    save_checkpoint(path, ckpt)
    return path


def reference_loss() -> float:
    rows = table().numpy().astype(np.float64)
    losses = [np.log(np.exp(rows[c]).sum()) - rows[c][label] for c, label in zip(CODES, LABELS)]
    return float(np.mean(losses))


def test_metrics_of_known_outputs(tmp_path):
    path = write_lookup_checkpoint(tmp_path / "run" / "best.pt")
    result = evaluate(path, lookup_data())
    assert result["test_top1"] == 0.5
    assert result["test_top5"] == 0.75
    assert result["test_loss"] == pytest.approx(reference_loss(), rel=1e-6)
    assert result["per_class"]["airplane"] == 1.0
    assert result["per_class"]["automobile"] == 0.0 and result["per_class"]["bird"] == 0.0
    assert result["per_class"]["truck"] is None  # no test image of that class
    confusion = np.array(result["confusion"])
    assert confusion.sum() == 4 and confusion[0, 0] == 2
    assert confusion[1, 2] == 1 and confusion[2, 9] == 1
    assert result["num_images"] == 4 and result["tta"] is False
    assert result["checkpoint"] == str(path)


def test_eval_json_is_written_beside_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    write_lookup_checkpoint(run / "best.pt")
    result = evaluate(run, lookup_data())  # a run folder stands for its best.pt
    written = json.loads((run / "eval.json").read_text())
    assert written == result
    assert set(written) == {"test_loss", "test_top1", "test_top5", "per_class", "confusion",
                            "tta", "views", "num_images", "checkpoint"}
    assert not list(run.glob(".*.tmp"))
    evaluate(run, lookup_data(), write=False)
    assert (run / "eval.json").stat().st_size > 0


def test_evaluating_another_checkpoint_keeps_the_runs_eval_json(tmp_path):
    # eval.json is the run's test of best.pt; evaluating last.pt must not replace it.
    run = tmp_path / "run"
    write_lookup_checkpoint(run / "best.pt")
    write_lookup_checkpoint(run / "last.pt")
    evaluate(run, lookup_data())
    best = (run / "eval.json").read_bytes()
    result = evaluate(run / "last.pt", lookup_data())
    assert (run / "eval.json").read_bytes() == best
    assert json.loads((run / "eval-last.json").read_text()) == result
    evaluate(run, lookup_data(), tta=True)  # best.pt again: its own file is replaced
    assert json.loads((run / "eval.json").read_text())["tta"] is True


def test_no_top5_with_five_classes_or_fewer():
    log_probs = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]), 1)
    metrics = classification_metrics(log_probs, torch.tensor([0, 0]), ("a", "b", "c"))
    assert metrics["test_top1"] == 0.5 and "test_top5" not in metrics


def test_tta_averages_probabilities_of_the_views():
    model = Lookup().eval()
    # left half code 3, right half code 7: pixel (0, 0) shows 3 unless the image is mirrored
    images = torch.as_tensor(coded_images([3], second_half=[7]))
    plain = log_probabilities(model, images, (0, 0, 0), (1, 1, 1))
    assert torch.allclose(plain, torch.log_softmax(table()[3], 0)[None])
    tta = log_probabilities(model, images, (0, 0, 0), (1, 1, 1), tta=True)
    expected = torch.log((torch.softmax(table()[3], 0) + torch.softmax(table()[7], 0)) / 2)
    assert torch.allclose(tta, expected[None], atol=1e-6)


def test_tta_views_two_are_the_image_and_its_mirror():
    assert views_for(False) == ((False, 0, 0),)
    assert views_for(True) == TTA_VIEWS and len(TTA_VIEWS) == 6
    assert views_for(True, 2) == ((False, 0, 0), (True, 0, 0))
    with pytest.raises(CifarInceptionError, match="2 or 6 views, not 3"):
        views_for(True, 3)


def test_two_view_tta_is_recorded_as_two_views(tmp_path):
    path = write_lookup_checkpoint(tmp_path / "best.pt")
    result = evaluate(path, lookup_data(), tta=True, tta_views=2, write=False)
    assert result["tta"] is True and result["views"] == 2
    assert evaluate(path, lookup_data(), write=False)["views"] == 1


def test_tta_changes_nothing_for_an_invariant_model(tmp_path):
    path = write_lookup_checkpoint(tmp_path / "best.pt")
    plain = evaluate(path, lookup_data(), write=False)
    tta = evaluate(path, lookup_data(), tta=True, write=False)
    assert tta["tta"] is True
    assert tta["test_top1"] == plain["test_top1"]
    assert tta["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-6)


def test_refuses_a_checkpoint_for_another_class_count(tmp_path):
    path = write_lookup_checkpoint(tmp_path / "best.pt", num_classes=5, classes=CLASSES[:5])
    with pytest.raises(CheckpointError, match="has 5 classes, not 10"):
        evaluate(path, lookup_data())


def test_refuses_a_checkpoint_with_other_class_names(tmp_path):
    other = ("cat", *CLASSES[1:3], "airplane", *CLASSES[4:])
    path = write_lookup_checkpoint(tmp_path / "best.pt", classes=other)
    with pytest.raises(CheckpointError, match="trained on classes"):
        evaluate(path, lookup_data())


def test_refuses_weights_for_another_model(tmp_path):
    path = write_lookup_checkpoint(tmp_path / "best.pt", name="googlenet")
    with pytest.raises(CheckpointError, match="do not fit model 'googlenet'"):
        evaluate(path, lookup_data())


@pytest.fixture
def run_and_tree(tmp_path):
    """A run folder holding the lookup model's best.pt, and :func:`every_class_data` as an
    image-folder tree for ``--data-dir``."""
    tree = tmp_path / "tree"
    write_image_tree(every_class_data(), tree)
    run = tmp_path / "run"
    write_lookup_checkpoint(run / "best.pt")
    return run, tree


def test_cli_prints_a_table_and_json(run_and_tree, capsys):
    run, tree = run_and_tree
    assert main(["evaluate", str(run), "--data-dir", str(tree)]) == 0
    out = capsys.readouterr().out
    assert "top-1        81.82%" in out and "top-5        90.91%" in out
    assert "airplane" in out and "100.00%" in out
    assert "confusion matrix (rows: true class, columns: predicted)" in out
    assert main(["evaluate", str(run), "--data-dir", str(tree), "--json", "--tta"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tta"] is True and printed["test_top1"] == pytest.approx(9 / 11)
    assert json.loads((run / "eval.json").read_text())["tta"] is True


@pytest.mark.parametrize("content, message", [
    (None, "no such checkpoint"),
    (b"not a checkpoint at all", "not a readable checkpoint"),
])
def test_cli_bad_checkpoints_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "model.pt"
    if content is not None:
        path.write_bytes(content)
    assert main(["evaluate", str(path), "--no-download", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cifar-inception: error: ") and message in err


def test_cli_refuses_an_unsafe_checkpoint(tmp_path, capsys):
    path = tmp_path / "unsafe.pt"
    torch.save({"format": "cifar-inception-checkpoint/1", "payload": Lookup}, path)
    assert main(["evaluate", str(path), "--no-download"]) == 2
    assert "refused" in capsys.readouterr().err


def test_cli_bad_batch_size_exits_2(tmp_path, capsys):
    path = write_lookup_checkpoint(tmp_path / "best.pt")
    assert main(["evaluate", str(path), "--batch-size", "0"]) == 2
    assert "batch size must be >= 1" in capsys.readouterr().err


def test_cli_says_where_it_wrote_eval_json(run_and_tree, capsys):
    run, tree = run_and_tree
    assert main(["evaluate", str(run), "--data-dir", str(tree)]) == 0
    assert f"wrote {run / 'eval.json'}" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--data-dir", str(tree), "--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays one JSON document
    assert f"wrote {run / 'eval.json'}" in captured.err
    assert main(["evaluate", str(run), "--data-dir", str(tree), "--no-write"]) == 0
    assert "\nwrote " not in capsys.readouterr().out
