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

from cifar_inception.errors import CifarInceptionError
from cifar_inception.fileio import atomic_write_text, check_replaceable
from cifar_inception.report.figures import check_misclassified_count, draw_figures
from cifar_inception.report.gather import RunData, gather
from cifar_inception.report.page import render_html

__all__ = ["Report", "RunData", "build_report", "gather"]


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
    if folder.exists() and not folder.is_dir():
        raise CifarInceptionError(f"{folder}: exists and is not a folder; the report is a "
                                  "folder of figures and report.html")
    page = folder / "report.html"
    check_replaceable(page)  # before any figure is drawn: not a report half written
    folder.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(data, folder, misclassified=misclassified)
    atomic_write_text(page, render_html(data, figures))
    return Report(folder=folder, html=page, figures=figures)
