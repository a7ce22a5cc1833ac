"""The report's page: one self-contained ``report.html``, with the figures embedded as data
URIs and inline CSS, so that it makes no request and can be mailed as one file."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from cifar_inception.report.gather import RunData
from cifar_inception.runs import best_epoch


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
        card("Test loss", "–" if ev.get("test_loss") is None else f"{ev['test_loss']:.4f}",
             "cross-entropy"),
    ]
    if ev.get("test_top5") is not None:  # only where there are more than 5 classes
        cards.insert(1, card("Test top-5", percent(ev["test_top5"])))
    if best is not None:
        sub = (f"validation accuracy {percent(best['val_acc'])}"
               if best.get("val_acc") is not None else "last epoch (no validation split)")
        last = max(row["epoch"] for row in data.metrics)  # rows a hand edit put out of order
        cards.append(card("Best epoch", f"{best['epoch']} of {last}", sub))
        seconds = sum(row.get("seconds") or 0 for row in data.metrics)
        if seconds and math.isfinite(seconds):  # two damaged rows of 1e308 sum to inf
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
    size = f"{data.image_size}x{data.image_size}"
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
                       f"Test images ({size} pixels, enlarged) that {data.checkpoint.name} gets "
                       "wrong with the highest predicted probability, without test-time "
                       "augmentation: black, the true class; red, the prediction."),
        figure_section("Sample training images", figures.get("samples"),
                       "Ten randomly chosen training images per class, as the model sees them "
                       f"({size}, before augmentation)."),
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
