"""report: figures and a self-contained report.html from a (generated) run folder."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image
from small_model import SMALL as TINY
from small_model import save_small_checkpoint

from cifar_inception import report
from cifar_inception.cli import main
from cifar_inception.errors import CifarInceptionError
from cifar_inception.report import figures as report_figures
from cifar_inception.report import page as report_page
from cifar_inception.runs import best_epoch

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
TRAIN_PER_CLASS, TEST_PER_CLASS = 10, 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- fixtures


def class_image(rng, label: int) -> np.ndarray:
    """Noise around a colour of the class's own, so the classes look different."""
    hue = np.array([(label * 37) % 256, (label * 91) % 256, (label * 157) % 256])
    return np.clip(hue + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data_tree(tmp_path_factory):
    """An image-folder CIFAR-10 look-alike: train/<class>/*.png and test/<class>/*.png."""
    root = tmp_path_factory.mktemp("cifar-tree")
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(class_image(rng, label)).save(folder / f"{i:04d}.png")
    return root


METRICS = [
    {"epoch": 1, "seconds": 10.5, "train_loss": 2.1, "train_acc": 0.22, "val_loss": 1.9,
     "val_acc": 0.31, "lr": 0.05},
    {"epoch": 2, "seconds": 10.1, "train_loss": 1.6, "train_acc": 0.41, "val_loss": 1.5,
     "val_acc": 0.47, "lr": 0.1},
    {"epoch": 3, "seconds": 9.9, "train_loss": 1.3, "train_acc": 0.53, "val_loss": 1.4,
     "val_acc": 0.52, "lr": 0.05},
    {"epoch": 4, "seconds": 10.0, "train_loss": 1.1, "train_acc": 0.61, "val_loss": 1.45,
     "val_acc": 0.5, "lr": 0.0},
]


def make_confusion(seed: int = 1, per_class: int = 1000) -> np.ndarray:
    """Random counts, mostly on the diagonal, ``per_class`` images per true class."""
    rng = np.random.default_rng(seed)
    confusion = rng.integers(0, per_class // 30 + 1, (10, 10))
    confusion[np.diag_indices(10)] = 0
    confusion[np.diag_indices(10)] = per_class - confusion.sum(axis=1)
    return confusion


def eval_document(confusion: np.ndarray) -> dict:
    totals = confusion.sum(axis=1)
    return {
        "test_loss": 0.98765, "test_top1": float(np.trace(confusion) / confusion.sum()),
        "test_top5": 0.9712,
        "per_class": {c: float(confusion[i, i] / totals[i]) for i, c in enumerate(CLASSES)},
        "confusion": confusion.tolist(), "tta": False, "num_images": int(confusion.sum()),
        "checkpoint": "best.pt",
    }


def write_run(folder, data_dir, *, eval_json: bool = True, fitting_eval: bool = False,
              metrics=METRICS):
    """A run folder as train and evaluate write it (the model is not trained: no need)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_small_checkpoint(folder / "best.pt", hidden=6, classes=list(CLASSES),
                          mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26],
                          metrics={"epoch": 3, "val_acc": 0.52})
    config = {"model": TINY, "model_options": {"hidden": 6}, "recipe": "default",
              "epochs": len(metrics), "batch_size": 128, "data_dir": str(data_dir),
              "note": "<script>alert(1)</script>",
              "versions": {"torch": torch.__version__},
              "command": ["cifar-inception", "train", "googlenet", "--width", "0.25"]}
    (folder / "config.json").write_text(json.dumps(config))
    lines = [json.dumps(row) for row in metrics]
    # A torn last line, as a crash mid-write leaves it: ignored, not fatal.
    (folder / "metrics.jsonl").write_text("\n".join(lines) + '\n{"epoch": 5, "tra')
    if eval_json:
        confusion = make_confusion(per_class=TEST_PER_CLASS if fitting_eval else 1000)
        (folder / "eval.json").write_text(json.dumps(eval_document(confusion)))
    return folder


class PageParser(HTMLParser):
    """Collects what a self-contained page must (not) have."""

    def __init__(self):
        super().__init__()
        self.images, self.external, self.scripts, self.rows, self.text = [], [], [], 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "script":
            self.scripts.append(attrs)
        if tag == "tr":
            self.rows += 1
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value and not value.startswith("data:") and not value.startswith("#"):
                self.external.append(value)

    def handle_data(self, data):
        self.text.append(data)


def parse_page(path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text())
    parser.text = " ".join(" ".join(parser.text).split())
    return parser


def check_png(path, min_size=(200, 150)):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        # A figure, not a blank canvas.
        assert np.asarray(image.convert("L")).std() > 5


# --------------------------------------------------------------------------- the whole report


def test_report_files_and_page(tmp_path, data_tree):
    run = write_run(tmp_path / "run", data_tree, fitting_eval=True)
    result = report.build_report(run, device="cpu")
    assert result.folder == run / "report"
    assert set(result.figures) == {"curves", "confusion", "misclassified", "samples"}
    for path in result.figures.values():
        assert path.parent == run / "report"
        check_png(path)
    leftovers = [p.name for p in result.folder.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # atomic writes leave no temporary files

    page = parse_page(result.html)
    assert len(page.images) == 4
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert page.external == [] and page.scripts == []
    html_text = result.html.read_text()
    assert "<link" not in html_text and "@import" not in html_text and "url(" not in html_text
    # The configuration is shown, escaped.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text
    assert "data_dir" in page.text and "cifar-inception train googlenet --width 0.25" in page.text
    # Metrics from eval.json and metrics.jsonl (best epoch by validation accuracy: 3).
    ev = eval_document(make_confusion(per_class=TEST_PER_CLASS))
    assert "Source: eval.json." in page.text
    assert f"{ev['test_top1'] * 100:.2f}%" in page.text
    assert "97.12%" in page.text and "0.9877" in page.text
    assert "3 of 4" in page.text and "52.00%" in page.text
    # Per-class table: header + 10 classes, each with its accuracy.
    for name, acc in ev["per_class"].items():
        assert re.search(rf"{name} {acc * 100:.1f}%", page.text), name
    assert f"{TINY}(hidden=6)" in page.text


def test_report_without_eval_json_evaluates_the_test_set(tmp_path, data_tree):
    """The metrics are those of the checkpoint's own predictions on the test images."""
    from cifar_inception.data import load_cifar10
    from cifar_inception.inference import load_classifier

    run = write_run(tmp_path / "run", data_tree, eval_json=False)
    data = report.gather(run, device="cpu")
    ev = data.evaluation
    assert ev["num_images"] == 10 * TEST_PER_CLASS and ev["tta"] is False

    test = load_cifar10(data_tree, download=False, progress=False)
    probs = load_classifier(run, device="cpu").predict_proba(test.test_images)
    predicted = probs.argmax(axis=1)
    expected_top1 = float((predicted == np.asarray(test.test_labels)).mean())
    assert ev["test_top1"] == pytest.approx(expected_top1)
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (np.asarray(test.test_labels), predicted), 1)
    assert np.array_equal(np.asarray(ev["confusion"]), confusion)
    np.testing.assert_allclose(data.test_probs, probs, rtol=1e-4, atol=1e-6)
    assert not (run / "eval.json").exists()  # the report writes only into its own folder


def test_stale_eval_json_is_not_used(tmp_path, data_tree):
    """An eval.json for another test set (or another checkpoint) would not match the figures."""
    run = write_run(tmp_path / "run", data_tree)  # its eval.json counts thousands of images
    data = report.gather(run, device="cpu")
    assert data.evaluation["num_images"] == 10 * TEST_PER_CLASS
    assert "eval.json is for" in data.evaluation_source
    fitting = eval_document(np.eye(10, dtype=int) * TEST_PER_CLASS)
    fitting["checkpoint"] = str(run / "last.pt")
    (run / "eval.json").write_text(json.dumps(fitting))
    assert "last.pt" in report.gather(run, device="cpu").evaluation_source
    fitting["checkpoint"] = str(run / "best.pt")
    (run / "eval.json").write_text(json.dumps(fitting))
    data = report.gather(run, device="cpu")
    assert data.evaluation_source == "eval.json" and data.evaluation == fitting


def test_damaged_records_are_dropped_or_refused_in_one_line(tmp_path, data_tree):
    """Lines and records no run writes: left out of the report, or one error; no traceback."""
    from cifar_inception.errors import CifarInceptionError

    run = write_run(tmp_path / "run", data_tree, fitting_eval=True)
    with open(run / "metrics.jsonl", "ab") as handle:
        handle.write(b'\n{"epoch": 4, "val_acc": "high"}\n{"epoch": 4, "x": "\xff"}\n'
                     b'{"epoch": 4, "lr": ' + b"1" * 5000 + b"}\n" + b"[" * 100_000 + b"\n")
    damaged = eval_document(np.eye(10, dtype=int) * TEST_PER_CLASS)
    damaged["test_loss"] = "low"
    (run / "eval.json").write_text(json.dumps(damaged))
    data = report.gather(run, device="cpu")
    assert [row["epoch"] for row in data.metrics] == [row["epoch"] for row in METRICS]
    assert "damaged" in data.evaluation_source
    for config, words in (('{"data_dir": 5}', "data_dir"), ("[" * 100_000, "nested")):
        (run / "config.json").write_text(config)
        with pytest.raises(CifarInceptionError, match=words):
            report.gather(run, device="cpu")


def test_cli_report(tmp_path, data_tree, capsys):
    run = write_run(tmp_path / "run", data_tree)
    (run / "config.json").write_text(json.dumps({"model": TINY}))  # no data_dir in it
    out_dir = tmp_path / "elsewhere"
    status = main(["report", str(run), "--data-dir", str(data_tree), "--no-download",
                   "--output", str(out_dir), "--misclassified", "8", "--device", "cpu"])
    out = capsys.readouterr().out
    assert status == 0
    assert f"wrote {out_dir / 'report.html'}" in out
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "confusion_matrix.png", "misclassified.png", "report.html", "samples.png",
        "training_curves.png"]
    assert not (run / "report").exists()


@pytest.mark.parametrize("target", ["missing", "checkpoint-file", "empty-folder"])
def test_cli_report_user_errors(tmp_path, data_tree, target, capsys):
    run = write_run(tmp_path / "run", data_tree)
    (tmp_path / "empty").mkdir()
    path = {"missing": tmp_path / "nope", "checkpoint-file": run / "best.pt",
            "empty-folder": tmp_path / "empty"}[target]
    assert main(["report", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cifar-inception: error: ") and err.count("\n") == 1


# --------------------------------------------------------------------------- the parts


def test_best_epoch():
    assert best_epoch(METRICS)["epoch"] == 3
    no_val = [dict(row, val_acc=None, val_loss=None) for row in METRICS]
    assert best_epoch(no_val)["epoch"] == 4
    assert best_epoch([]) is None


def test_most_confident_mistakes():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.05, 0.95], [0.7, 0.3]])
    labels = np.array([0, 0, 1, 0, 1])
    # Wrong: 1 (0.8 sure), 2 (0.6), 3 (0.95), 4 (0.7); most confident first.
    assert report_figures.most_confident_mistakes(probs, labels, 3).tolist() == [3, 1, 4]
    assert report_figures.most_confident_mistakes(probs[:1], labels[:1], 5).tolist() == []


def test_per_class_rows_from_confusion():
    confusion = np.array([[8, 2, 0], [1, 5, 4], [0, 0, 10]])
    data = report.RunData(run=None, checkpoint=None, classes=("a", "b", "c"), config={},
                          metrics=[], evaluation={"confusion": confusion.tolist()},
                          evaluation_source="eval.json",
                          model_info={"model": "m"})
    a, b, c = report_page.per_class_rows(data)
    assert a["accuracy"] == pytest.approx(0.8) and a["precision"] == pytest.approx(8 / 9)
    assert b["confused"] == ("c", 4) and b["correct"] == 5 and b["total"] == 10
    assert c["confused"] is None and c["precision"] == pytest.approx(10 / 14)


def test_curves_without_validation_and_single_epoch(tmp_path):
    no_val = [dict(row, val_acc=None, val_loss=None) for row in METRICS]
    check_png(report_figures.plot_training_curves(no_val, tmp_path / "a.png"))
    check_png(report_figures.plot_training_curves(METRICS[:1], tmp_path / "b.png"))


def test_misclassified_grid_when_nothing_is_wrong(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(6) % 3
    probs = np.eye(3)[labels] * 0.9 + 0.1 / 3
    path = report_figures.plot_misclassified(images, labels, probs, ("a", "b", "c"), tmp_path / "m.png")
    check_png(path, min_size=(100, 20))


def test_confusion_figure_large_counts(tmp_path):
    check_png(report_figures.plot_confusion_matrix(make_confusion() * 100, CLASSES, tmp_path / "c.png"))


def test_format_duration():
    assert report_page.format_duration(42) == "42s"
    assert report_page.format_duration(630) == "10m 30s"
    assert report_page.format_duration(3 * 3600 + 5 * 60) == "3h 05m"


@pytest.mark.parametrize("count", ["1000000", "0", "201"])
def test_cli_report_bounds_the_misclassified_count(tmp_path, data_tree, capsys, monkeypatch,
                                                   count):
    run = write_run(tmp_path / "run", data_tree)
    gathered = []
    monkeypatch.setattr(report, "gather", lambda *a, **k: gathered.append(a))
    assert main(["report", str(run), "--data-dir", str(data_tree), "--no-download",
                 "--misclassified", count, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be from 1 to 200" in err
    assert gathered == [] and not (run / "report").exists()  # refused before any work


def test_misclassified_figure_shows_at_most_what_exists(tmp_path):
    labels = np.array([0, 1, 2, 0])
    probs = np.eye(3)[[1, 1, 2, 2]]  # two mistakes
    images = np.zeros((4, 32, 32, 3), np.uint8)
    assert len(report_figures.most_confident_mistakes(probs, labels, report_figures.MAX_MISCLASSIFIED)) == 2
    with pytest.raises(CifarInceptionError, match="must be from 1 to 200"):
        report_figures.plot_misclassified(images, labels, probs, ("a", "b", "c"), tmp_path / "m.png",
                                  count=10**6)


@pytest.mark.parametrize("confusion", [[[4, 4], [4, 4]], [[4, 4, 4], [4], [0, 0, 0]], [],
                                       [[10**25] * 10] * 10])
def test_an_eval_json_whose_confusion_matrix_does_not_fit_is_recomputed(tmp_path, data_tree,
                                                                       confusion):
    run = write_run(tmp_path / "run", data_tree, fitting_eval=True)
    damaged = json.loads((run / "eval.json").read_text())
    damaged["confusion"] = confusion
    (run / "eval.json").write_text(json.dumps(damaged))
    data = report.gather(run, device="cpu")
    assert "confusion matrix is not one of 10 classes" in data.evaluation_source
    assert np.asarray(data.evaluation["confusion"]).shape == (10, 10)


def test_damaged_metrics_rows_do_not_break_the_report(tmp_path, data_tree, capsys):
    # Durations summing to inf, and losses that leave matplotlib no finite axis: left out.
    rows = [dict(row) for row in METRICS]
    rows[0].update(seconds=1e308, train_loss=1e308, val_loss=-1e308)
    rows[1].update(seconds=1e308)
    run = write_run(tmp_path / "run", data_tree, fitting_eval=True, metrics=rows)
    out_dir = tmp_path / "out"
    assert main(["report", str(run), "--data-dir", str(data_tree), "--no-download",
                 "--output", str(out_dir), "--device", "cpu"]) == 0, capsys.readouterr().err
    assert "Training time" not in (out_dir / "report.html").read_text()


def test_class_names_with_dollar_signs_are_drawn_as_written(tmp_path):
    # matplotlib reads "$...$" as math text; an unknown command in it failed the figure.
    from cifar_inception.plots import class_grid

    classes = ("$\\undefined$", "5$", "plain")
    report_figures.plot_confusion_matrix(np.eye(3, dtype=int) * 4, classes,
                                         tmp_path / "confusion.png")
    images = np.zeros((6, 8, 8, 3), np.uint8)
    class_grid(images, np.array([0, 0, 1, 1, 2, 2]), classes, tmp_path / "grid.png",
               per_class=2)
    assert (tmp_path / "confusion.png").stat().st_size and (tmp_path / "grid.png").stat().st_size


@pytest.mark.parametrize("blocker", ["output-is-a-file", "page-is-a-folder"])
def test_an_output_that_cannot_be_written_is_refused_before_any_figure(tmp_path, data_tree,
                                                                     blocker, capsys):
    run = write_run(tmp_path / "run", data_tree, fitting_eval=True)
    out_dir = tmp_path / "out"
    if blocker == "output-is-a-file":
        out_dir.write_text("mine")
    else:
        (out_dir / "report.html").mkdir(parents=True)
    assert main(["report", str(run), "--data-dir", str(data_tree), "--no-download",
                 "--output", str(out_dir), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not list(out_dir.glob("*.png")) if out_dir.is_dir() else out_dir.read_text() == "mine"
