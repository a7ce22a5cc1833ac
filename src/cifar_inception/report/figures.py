"""The report's figures, drawn with matplotlib: training curves, the confusion matrix, the
most confident mistakes (and, from :mod:`cifar_inception.plots`, sample images per class).

matplotlib is imported only when drawing, with the Agg canvas (no display needed) and
without pyplot's global state; every PNG is written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from cifar_inception.errors import CifarInceptionError
from cifar_inception.fileio import atomic_write_bytes
from cifar_inception.plots import plain_text
from cifar_inception.report.gather import RunData
from cifar_inception.runs import best_epoch

FIGURE_DPI = 110
# Most mistakes one figure shows: 200 is 25 rows of 8; each further row adds about 170 KB of
# pixels and 16 text artists, so a million asked for would take gigabytes.
MAX_MISCLASSIFIED = 200
TRAIN_COLOUR, VAL_COLOUR, WRONG_COLOUR = "#1f77b4", "#d62728", "#c0392b"


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


# The largest magnitude drawn: a damaged metrics.jsonl's 1e308 leaves matplotlib no finite
# axis to draw on (its transform fails); such a point is left out.
MAX_PLOTTED = 1e12


@plain_text()
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
                      if row.get(f"{split}_{key}") is not None
                      and abs(row[f"{split}_{key}"] * scale) <= MAX_PLOTTED]
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
    if loss_ax.get_lines():  # a legend without lines is a matplotlib warning
        loss_ax.legend(loc="best", framealpha=0.9, edgecolor="none")
    if len(epochs) == 1:
        for ax in (loss_ax, acc_ax):
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
            ax.set_xticks(epochs)
    figure.tight_layout()
    return save_figure(figure, path)


# Beyond this many classes the cells are too small for counts: colour alone shows them, and
# the figure stops growing (a 100-class matrix at the 10-class cell size is 60 inches wide).
MAX_COUNTED_CLASSES = 20


@plain_text()
def plot_confusion_matrix(confusion: np.ndarray, classes: tuple[str, ...], path: Path) -> Path:
    """Counts in each cell; colour is the fraction of the true class (so rows compare)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    totals = confusion.sum(axis=1, keepdims=True)
    fractions = confusion / np.maximum(totals, 1)
    n = len(classes)
    counted = n <= MAX_COUNTED_CLASSES
    cell = 0.6 if counted else max(0.14, 12.0 / n)
    figure = new_figure(1.0 + (cell + 0.02) * n, 0.6 + cell * n)
    ax = figure.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    for true in range(n if counted else 0):
        for pred in range(n):
            count = confusion[true, pred]
            if count == 0:
                continue
            colour = "white" if fractions[true, pred] > 0.55 else "#222222"
            ax.text(pred, true, str(count), ha="center", va="center", fontsize=8, color=colour)
    labels_size = 10 if counted else 5
    ax.set_xticks(range(n), classes, rotation=45 if counted else 90, ha="right",
                  rotation_mode="anchor", fontsize=labels_size)
    ax.set_yticks(range(n), classes, fontsize=labels_size)
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


def check_misclassified_count(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) \
            or not 1 <= count <= MAX_MISCLASSIFIED:
        raise CifarInceptionError(f"the number of misclassified images to show must be from 1 "
                                  f"to {MAX_MISCLASSIFIED}, not {count!r}")


@plain_text()
def plot_misclassified(images: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                       classes: tuple[str, ...], path: Path, *, count: int = 40,
                       columns: int = 8) -> Path:
    """The test images the model gets wrong with the most confidence, true vs predicted:
    at most ``count``, which must be from 1 to :data:`MAX_MISCLASSIFIED`."""
    check_misclassified_count(count)
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
    # text above and two below. The layout is that of 32x32 images, in their pixels; other
    # sizes are shown at the same size on the page (the text keeps its size with them).
    size = images.shape[1]
    scale = size / 32
    cell_w, top, bottom = max(size, round(44 * scale)), round(7 * scale), round(14 * scale)
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
        ax.text(centre, y - 1.5 * scale, f"true: {classes[labels[index]]}", ha="center", va="bottom",
                fontsize=8, color="#222222")
        ax.text(centre, y + size + 0.5 * scale,
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
    """Every figure the run's data allows, as PNG files in ``folder``, by kind."""
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
