"""A run folder -> PNG figures and one self-contained ``report.html``, in ``RUN/report/``.

Figures: training curves (from ``metrics.jsonl``), the confusion matrix (from ``eval.json``;
without one, computed as :mod:`cifar_inception.evaluation` does), the test images the model
gets most confidently wrong, and ten sample training images per class. The HTML page
embeds them as data URIs with inline CSS: it makes no request and can be mailed as one file.

:func:`build_report` takes three steps, one module each: :mod:`~.gather` reads the run and
predicts the test set (:class:`RunData`), :mod:`~.figures` draws, :mod:`~.page` writes the
HTML. Every file is written atomically. matplotlib is imported only when drawing, with the
Agg canvas (no display needed) and without pyplot's global state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cifar_inception.fileio import atomic_write_text
from cifar_inception.report.figures import (
    FIGURE_DPI,
    MAX_MISCLASSIFIED,
    TRAIN_COLOUR,
    VAL_COLOUR,
    WRONG_COLOUR,
    check_misclassified_count,
    draw_figures,
    most_confident_mistakes,
    new_figure,
    plot_confusion_matrix,
    plot_misclassified,
    plot_training_curves,
    save_figure,
)
from cifar_inception.report.gather import RunData, gather, predict_test_set, saved_evaluation
from cifar_inception.report.page import (
    CSS,
    card,
    config_groups,
    config_table,
    config_value,
    esc,
    figure_section,
    flatten,
    format_duration,
    image_tag,
    metric_cards,
    model_line,
    per_class_rows,
    per_class_table,
    percent,
    render_html,
)
from cifar_inception.runs import best_epoch, recorded_data_dir
from cifar_inception.runs import read_json_object as read_json

# What this module offered before it became a package: still importable from here.
__all__ = [
    "Report", "build_report",
    "RunData", "gather", "predict_test_set", "saved_evaluation",
    "read_json", "best_epoch", "recorded_data_dir",
    "FIGURE_DPI", "TRAIN_COLOUR", "VAL_COLOUR", "WRONG_COLOUR", "new_figure", "save_figure",
    "plot_training_curves", "plot_confusion_matrix", "most_confident_mistakes",
    "plot_misclassified", "draw_figures", "MAX_MISCLASSIFIED",
    "check_misclassified_count",
    "CSS", "esc", "percent", "image_tag", "card", "format_duration", "metric_cards",
    "per_class_rows", "per_class_table", "flatten", "config_groups", "config_value",
    "config_table", "figure_section", "model_line", "render_html",
]


@dataclass
class Report:
    folder: Path
    html: Path
    figures: dict[str, Path] = field(default_factory=dict)


def build_report(run: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
                 output: str | os.PathLike | None = None, download: bool = True,
                 progress: bool = False, device: str | None = None,
                 misclassified: int = 40) -> Report:
    """Write the figures and ``report.html`` into ``output`` (default ``RUN/report``)."""
    check_misclassified_count(misclassified)  # before the test set is predicted
    data = gather(run, data_dir=data_dir, download=download, progress=progress, device=device)
    folder = Path(output) if output is not None else data.run / "report"
    folder.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(data, folder, misclassified=misclassified)
    page = folder / "report.html"
    atomic_write_text(page, render_html(data, figures))
    return Report(folder=folder, html=page, figures=figures)
