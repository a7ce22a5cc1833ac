"""A run folder -> PNG figures and one self-contained ``report.html``, in ``RUN/report/``.

Figures: training curves (from ``metrics.jsonl``), the confusion matrix (from ``eval.json``;
without one, computed as :mod:`cifar_inception.evaluation` does), the test images the model
gets most confidently wrong, and ten sample training images per class. The HTML page
embeds them as data URIs with inline CSS: it makes no request and can be mailed as one file.

Every file is written atomically. matplotlib is imported only when drawing, with the Agg
canvas (no display needed) and without pyplot's global state.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cifar_inception.errors import CheckpointError, CifarInceptionError
from cifar_inception.fileio import atomic_write_bytes, atomic_write_text
from cifar_inception.inference import TorchClassifier
from cifar_inception.runs import CONFIG_FILE, EVAL_FILE, read_history

FIGURE_DPI = 110
TRAIN_COLOUR, VAL_COLOUR, WRONG_COLOUR = "#1f77b4", "#d62728", "#c0392b"


# --------------------------------------------------------------------------- run contents


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
    data_source: str = ""
    test_images: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    test_probs: np.ndarray | None = None
    train_images: np.ndarray | None = None
    train_labels: np.ndarray | None = None


@dataclass
class Report:
    folder: Path
    html: Path
    figures: dict[str, Path] = field(default_factory=dict)


def read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CifarInceptionError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(content, dict):
        raise CifarInceptionError(f"{path}: expected a JSON object")
    return content


def best_epoch(metrics: list[dict]) -> dict | None:
    """The epoch with the best validation accuracy, or the last one without validation."""
    with_val = [row for row in metrics if row.get("val_acc") is not None]
    if with_val:
        return max(with_val, key=lambda row: row["val_acc"])  # first of equals, like training
    return metrics[-1] if metrics else None


def recorded_data_dir(config: dict, ckpt: dict) -> str | None:
    """The data folder the run was trained on: config.json's, else the checkpoint's."""
    for settings in (config.get("config"), config, ckpt.get("training", {}).get("config")):
        if isinstance(settings, dict) and settings.get("data_dir"):
            return settings["data_dir"]
    return None


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


def saved_evaluation(path: Path, checkpoint: Path,
                     num_images: int) -> tuple[dict | None, str]:
    """eval.json when it describes this checkpoint on this test set; else None and why not."""
    if not path.is_file():
        return None, "computed for this report (the run has no eval.json)"
    evaluation = read_json(path)
    if evaluation.get("num_images") != num_images:
        return None, (f"computed for this report (eval.json is for {evaluation.get('num_images')} "
                      f"test images, this data has {num_images:,})")
    recorded = evaluation.get("checkpoint")
    if recorded and Path(recorded).name != checkpoint.name:
        return None, (f"computed for this report (eval.json is for {Path(recorded).name}, "
                      f"this report for {checkpoint.name})")
    return evaluation, EVAL_FILE


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
        load_trained_model,
        resolve_checkpoint,
    )
    from cifar_inception.data import load_cifar10
    from cifar_inception.evaluation import classification_metrics

    run = Path(run)
    if not run.is_dir():
        raise CifarInceptionError(f"{run}: not a run folder (a report needs the folder that "
                                  "train wrote, with its metrics and configuration)")
    checkpoint = resolve_checkpoint(run)
    config = read_json(run / CONFIG_FILE) if (run / CONFIG_FILE).is_file() else {}
    metrics = read_history(run)
    model, ckpt = load_trained_model(checkpoint)
    check_run_matches(ckpt, checkpoint)  # else one run's curves beside another's results
    if data_dir is None:
        data_dir = recorded_data_dir(config, ckpt)
    classifier = TorchClassifier(model, ckpt, source=str(checkpoint), device=device)
    data = load_cifar10(data_dir, download=download, progress=progress)
    if tuple(data.classes) != classifier.classes:
        raise CheckpointError(
            f"{checkpoint} was trained on classes {', '.join(classifier.classes)}; "
            f"the data has {', '.join(data.classes)}")

    labels = torch.as_tensor(np.asarray(data.test_labels))
    log_probs = predict_test_set(classifier, data.test_images, progress=progress)
    evaluation, evaluation_source = saved_evaluation(run / EVAL_FILE, checkpoint, len(labels))
    if evaluation is None:
        evaluation = classification_metrics(log_probs, labels, data.classes)
        evaluation.update(tta=False, num_images=len(labels), checkpoint=str(checkpoint))
    return RunData(
        run=run, checkpoint=checkpoint, classes=classifier.classes, config=config,
        metrics=metrics, evaluation=evaluation, evaluation_source=evaluation_source,
        model_info=classifier.info,
        data_source=getattr(data, "source", ""),
        test_images=data.test_images, test_labels=labels.numpy(),
        test_probs=log_probs.exp().numpy(),
        train_images=data.train_images, train_labels=np.asarray(data.train_labels),
    )


# --------------------------------------------------------------------------- figures


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: Path) -> Path:
    """Render to memory, then write atomically: a reader never sees half a PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight",
                   facecolor="white")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_training_curves(metrics: list[dict], path: Path) -> Path:
    """Loss and accuracy per epoch, training against validation, the best epoch marked."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    epochs = [row["epoch"] for row in metrics]
    marker = "o" if len(epochs) <= 30 else None
    figure = new_figure(11, 4.2)
    loss_ax, acc_ax = figure.subplots(1, 2)
    panels = ((loss_ax, "loss", "Loss (cross-entropy)", 1.0),
              (acc_ax, "acc", "Accuracy", 100.0))
    for ax, key, title, scale in panels:
        for split, colour in (("train", TRAIN_COLOUR), ("val", VAL_COLOUR)):
            points = [(row["epoch"], row[f"{split}_{key}"] * scale) for row in metrics
                      if row.get(f"{split}_{key}") is not None]
            if points:
                xs, ys = zip(*points)
                label = "training" if split == "train" else "validation"
                ax.plot(xs, ys, color=colour, marker=marker, markersize=4, linewidth=1.8,
                        label=label)
        ax.set_title(title, fontsize=12)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, color="#e5e5e5", linewidth=0.8)
        ax.spines[["top", "right"]].set_visible(False)
    # As many decimals as the ticks need, no trailing zeros: 15%, 12.5%, 88.75%.
    acc_ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{round(value, 4):g}%"))
    best = best_epoch(metrics)
    if best is not None and best.get("val_acc") is not None:
        if len(epochs) > 1:
            for ax in (loss_ax, acc_ax):
                ax.axvline(best["epoch"], color="#888888", linestyle="--", linewidth=1)
        # Accuracy rises, so the lower right corner is the free one.
        acc_ax.text(0.98, 0.04, f"best validation: {best['val_acc'] * 100:.2f}%\n"
                    f"at epoch {best['epoch']}", transform=acc_ax.transAxes,
                    ha="right", va="bottom", fontsize=9, color="#444444",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 2})
    loss_ax.legend(loc="best", framealpha=0.9, edgecolor="none")
    if len(epochs) == 1:
        for ax in (loss_ax, acc_ax):
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
            ax.set_xticks(epochs)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_confusion_matrix(confusion: np.ndarray, classes: tuple[str, ...], path: Path) -> Path:
    """Counts in each cell; colour is the fraction of the true class (so rows compare)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    totals = confusion.sum(axis=1, keepdims=True)
    fractions = confusion / np.maximum(totals, 1)
    n = len(classes)
    figure = new_figure(1.0 + 0.62 * n, 0.6 + 0.58 * n)
    ax = figure.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    for true in range(n):
        for pred in range(n):
            count = confusion[true, pred]
            if count == 0:
                continue
            colour = "white" if fractions[true, pred] > 0.55 else "#222222"
            ax.text(pred, true, str(count), ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix ({int(confusion.sum()):,} test images)", fontsize=12)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    colorbar = figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    colorbar.set_label("fraction of the true class")
    colorbar.outline.set_visible(False)
    figure.tight_layout()
    return save_figure(figure, path)


def most_confident_mistakes(probs: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of wrong predictions, the most confident first (ties: dataset order)."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probs[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")[:count]]


def plot_misclassified(images: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                       classes: tuple[str, ...], path: Path, *, count: int = 40,
                       columns: int = 8) -> Path:
    """The test images the model gets wrong with the most confidence, true vs predicted."""
    chosen = most_confident_mistakes(probs, labels, count)
    total_wrong = int((probs.argmax(axis=1) != labels).sum())
    if len(chosen) == 0:
        figure = new_figure(6, 1.0)
        figure.text(0.5, 0.5, f"No misclassified test images: all {len(labels):,} are right.",
                    ha="center", va="center", fontsize=12)
        return save_figure(figure, path)
    columns = min(columns, len(chosen))
    rows = -(-len(chosen) // columns)
    # One mosaic on one axes (fast to draw): each cell is the image with room for a line of
    # text above and two below, in image-pixel units.
    cell_w, top, bottom, size = 44, 7, 14, images.shape[1]
    cell_h = top + size + bottom
    mosaic = np.full((rows * cell_h, columns * cell_w, 3), 255, dtype=np.uint8)
    inch = 1.3 / cell_w  # figure inches per image pixel
    title_in = 0.45
    height_in = rows * cell_h * inch + title_in
    figure = new_figure(columns * cell_w * inch, height_in)
    ax = figure.add_axes((0, 0, 1, 1 - title_in / height_in))
    for k, index in enumerate(chosen):
        row, column = divmod(k, columns)
        y, x = row * cell_h + top, column * cell_w + (cell_w - size) // 2
        mosaic[y:y + size, x:x + size] = images[index]
        predicted = int(probs[index].argmax())
        centre = x + (size - 1) / 2
        ax.text(centre, y - 1.5, f"true: {classes[labels[index]]}", ha="center", va="bottom",
                fontsize=8, color="#222222")
        ax.text(centre, y + size + 0.5,
                f"predicted: {classes[predicted]}\n{probs[index, predicted]:.0%} sure",
                ha="center", va="top", fontsize=8, color=WRONG_COLOUR, linespacing=1.3)
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    figure.text(0.5, 1 - 0.12 / height_in,
                f"The {len(chosen)} most confident mistakes ({total_wrong:,} of "
                f"{len(labels):,} test images misclassified)", ha="center", va="top",
                fontsize=12)
    return save_figure(figure, path)


def draw_figures(data: RunData, folder: Path, *, misclassified: int = 40) -> dict[str, Path]:
    from cifar_inception.plots import class_grid

    figures: dict[str, Path] = {}
    if data.metrics:
        figures["curves"] = plot_training_curves(data.metrics, folder / "training_curves.png")
    if data.evaluation.get("confusion") is not None:
        figures["confusion"] = plot_confusion_matrix(
            np.asarray(data.evaluation["confusion"]), data.classes,
            folder / "confusion_matrix.png")
    if data.test_probs is not None:
        figures["misclassified"] = plot_misclassified(
            data.test_images, data.test_labels, data.test_probs, data.classes,
            folder / "misclassified.png", count=misclassified)
    if data.train_images is not None:
        samples = folder / "samples.png"
        class_grid(data.train_images, data.train_labels, data.classes, samples,
                   per_class=10, seed=0)
        figures["samples"] = samples
    return figures


# --------------------------------------------------------------------------- HTML


CSS = """
:root { --ink: #1d2329; --muted: #5f6b76; --line: #e3e7eb; --accent: #1f6fb2;
        --bg: #f6f8fa; --good: #2e8540; --bad: #c0392b; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 32px 24px 48px; }
header h1 { margin: 0 0 4px; font-size: 26px; font-weight: 650; }
header p { margin: 0; color: var(--muted); }
code { font: 13px/1.4 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px;
          padding: 20px 24px; margin-top: 22px; }
h2 { margin: 0 0 12px; font-size: 18px; font-weight: 620; }
.note { color: var(--muted); font-size: 13px; margin: 6px 0 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr));
         gap: 14px; margin-top: 22px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
               letter-spacing: .04em; }
.card .value { font-size: 26px; font-weight: 650; margin-top: 2px; }
.card .sub { color: var(--muted); font-size: 12px; }
figure { margin: 0; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 8px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 7px 10px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th.num { text-align: right; }
th { color: var(--muted); font-weight: 600; font-size: 12px; text-transform: uppercase;
     letter-spacing: .04em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.meter { display: flex; align-items: center; gap: 10px; }
.meter .num { width: 52px; text-align: right; font-variant-numeric: tabular-nums; }
.bar { position: relative; flex: 1; background: #edf1f5; border-radius: 4px; height: 10px;
       min-width: 120px; }
.bar span { position: absolute; left: 0; top: 0; bottom: 0; border-radius: 4px;
            background: var(--accent); }
.config { columns: 2 420px; column-gap: 36px; }
.config .group { break-inside: avoid; margin-bottom: 18px; }
.config h3 { margin: 0 0 4px; font-size: 12px; text-transform: uppercase;
             letter-spacing: .05em; color: var(--muted); }
.config td { font-size: 13px; padding: 4px 8px; word-break: break-word; }
.config td:first-child { width: 45%; color: var(--muted); }
.config .none { color: #a0a8b0; }
footer { color: var(--muted); font-size: 12px; margin-top: 26px; text-align: center; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def percent(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value * 100:.{digits}f}%"


def image_tag(path: Path, alt: str) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{esc(alt)}">'


def card(label: str, value: str, sub: str = "") -> str:
    sub_html = f'<div class="sub">{esc(sub)}</div>' if sub else ""
    return (f'<div class="card"><div class="label">{esc(label)}</div>'
            f'<div class="value">{esc(value)}</div>{sub_html}</div>')


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def metric_cards(data: RunData) -> str:
    ev = data.evaluation
    best = best_epoch(data.metrics)
    tta = " with TTA" if ev.get("tta") else ""
    images = f"{ev['num_images']:,} test images{tta}" if ev.get("num_images") else tta.strip()
    cards = [
        card("Test top-1", percent(ev.get("test_top1")), images),
        card("Test top-5", percent(ev.get("test_top5"))),
        card("Test loss", "–" if ev.get("test_loss") is None else f"{ev['test_loss']:.4f}",
             "cross-entropy"),
    ]
    if best is not None:
        sub = (f"validation accuracy {percent(best['val_acc'])}"
               if best.get("val_acc") is not None else "last epoch (no validation split)")
        cards.append(card("Best epoch", f"{best['epoch']} of {data.metrics[-1]['epoch']}", sub))
        seconds = sum(row.get("seconds") or 0 for row in data.metrics)
        if seconds:
            cards.append(card("Training time", format_duration(seconds),
                              f"{len(data.metrics)} epochs"))
    params = data.model_info.get("params")
    if params:
        cards.append(card("Parameters", f"{params / 1e6:.2f} M", data.model_info["model"]))
    return f'<div class="cards">{"".join(cards)}</div>'


def per_class_rows(data: RunData) -> list[dict]:
    """Accuracy, precision and the most frequent confusion of each class."""
    ev = data.evaluation
    confusion = np.asarray(ev["confusion"]) if ev.get("confusion") is not None else None
    rows = []
    for i, name in enumerate(data.classes):
        row = {"class": name, "accuracy": (ev.get("per_class") or {}).get(name)}
        if confusion is not None:
            total, correct = int(confusion[i].sum()), int(confusion[i, i])
            predicted_as = int(confusion[:, i].sum())
            others = confusion[i].copy()
            others[i] = -1
            worst = int(others.argmax())
            row.update(total=total, correct=correct,
                       precision=correct / predicted_as if predicted_as else None,
                       confused=(data.classes[worst], int(others[worst]))
                       if others[worst] > 0 else None)
            if row["accuracy"] is None and total:
                row["accuracy"] = correct / total
        rows.append(row)
    return rows


def per_class_table(data: RunData) -> str:
    body = []
    for row in per_class_rows(data):
        acc = row["accuracy"]
        bar = (f'<div class="bar"><span style="width:{acc * 100:.1f}%"></span></div>'
               if acc is not None else '<div class="bar"></div>')
        counts = (f'{row["correct"]:,} / {row["total"]:,}' if "total" in row else "–")
        confused = ("–" if not row.get("confused")
                    else f'{esc(row["confused"][0])} ({row["confused"][1]:,})')
        body.append(
            f'<tr><td>{esc(row["class"])}</td><td><div class="meter">{bar}'
            f'<span class="num">{percent(acc, 1)}</span></div></td>'
            f'<td class="num">{counts}</td><td class="num">{percent(row.get("precision"), 1)}'
            f"</td><td>{confused}</td></tr>")
    return ('<table><thead><tr><th>Class</th><th style="width:40%">Accuracy (recall)</th>'
            '<th class="num">Correct</th><th class="num">Precision</th>'
            "<th>Most often taken for</th></tr></thead>"
            f'<tbody>{"".join(body)}</tbody></table>')


def flatten(config: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as dotted keys, so each group reads as one flat list."""
    items = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items.extend(flatten(value, f"{name}."))
        else:
            items.append((name, value))
    return items


def config_groups(config: dict) -> list[tuple[str, list[tuple[str, Any]]]]:
    """Top-level scalars first (as "run"), then one group per top-level dict."""
    loose = {k: v for k, v in config.items() if not (isinstance(v, dict) and v)}
    groups = [("run", flatten(loose))] if loose else []
    groups += [(k, flatten(v)) for k, v in config.items() if isinstance(v, dict) and v]
    return groups


def config_value(value: Any) -> str:
    if value is None or value == [] or value == {}:
        return '<span class="none">none</span>'
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return f"<code>{esc(' '.join(value))}</code>"
    if isinstance(value, list) and all(isinstance(v, float) for v in value):
        return f"<code>[{esc(', '.join(f'{v:.6g}' for v in value))}]</code>"
    if isinstance(value, (dict, list, bool)):  # as config.json has them: true, [0.3, 0.3]
        return f"<code>{esc(json.dumps(value))}</code>"
    return esc(value)


def config_table(config: dict) -> str:
    if not config:
        return '<p class="note">The run folder has no config.json.</p>'
    groups = []
    for title, items in config_groups(config):
        rows = "".join(f"<tr><td>{esc(k)}</td><td>{config_value(v)}</td></tr>"
                       for k, v in items)
        groups.append(f'<div class="group"><h3>{esc(title)}</h3>'
                      f"<table><tbody>{rows}</tbody></table></div>")
    return f'<div class="config">{"".join(groups)}</div>'


def figure_section(title: str, path: Path | None, caption: str) -> str:
    if path is None:
        return ""
    return (f"<section><h2>{esc(title)}</h2><figure>{image_tag(path, title)}"
            f"<figcaption>{esc(caption)}</figcaption></figure></section>")


def model_line(info: dict) -> str:
    options = ", ".join(f"{k}={v}" for k, v in (info.get("options") or {}).items())
    return f"{info['model']}({options})" if options else info["model"]


def render_html(data: RunData, figures: dict[str, Path]) -> str:
    from cifar_inception import __version__

    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    source = f" · data: {data.data_source}" if data.data_source else ""
    sections = [
        figure_section("Training curves", figures.get("curves"),
                       "Per epoch: training loss and accuracy are averaged over the epoch "
                       "(with augmentation); validation is measured after it. The dashed line "
                       "marks the best validation epoch, whose weights are best.pt."),
        figure_section("Confusion matrix", figures.get("confusion"),
                       "Rows are true classes, columns predicted ones; numbers are image "
                       f"counts, colour the fraction of the true class. Source: "
                       f"{data.evaluation_source}."),
        "<section><h2>Per-class results</h2>" + per_class_table(data) + "</section>",
        figure_section("Most confident mistakes", figures.get("misclassified"),
                       f"Test images (32x32 pixels, enlarged) that {data.checkpoint.name} gets "
                       "wrong with the highest predicted probability, without test-time "
                       "augmentation: black, the true class; red, the prediction."),
        figure_section("Sample training images", figures.get("samples"),
                       "Ten randomly chosen training images per class, as the model sees them "
                       "(32x32, before augmentation)."),
        "<section><h2>Configuration</h2>" + config_table(data.config) + "</section>",
    ]
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(data.run.name)}: cifar-inception report</title>
<style>{CSS}</style>
</head>
<body>
<main>
<header>
<h1>{esc(data.run.name)}</h1>
<p><code>{esc(model_line(data.model_info))}</code> · {len(data.classes)} classes ·
checkpoint <code>{esc(data.checkpoint.name)}</code>{esc(source)}</p>
</header>
{metric_cards(data)}
{"".join(sections)}
<footer>Made by cifar-inception {esc(__version__)} on {esc(when)}.</footer>
</main>
</body>
</html>
"""


# --------------------------------------------------------------------------- entry point


def build_report(run: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
                 output: str | os.PathLike | None = None, download: bool = True,
                 progress: bool = False, device: str | None = None,
                 misclassified: int = 40) -> Report:
    """Write the figures and ``report.html`` into ``output`` (default ``RUN/report``)."""
    data = gather(run, data_dir=data_dir, download=download, progress=progress, device=device)
    folder = Path(output) if output is not None else data.run / "report"
    folder.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(data, folder, misclassified=misclassified)
    page = folder / "report.html"
    atomic_write_text(page, render_html(data, figures))
    return Report(folder=folder, html=page, figures=figures)
