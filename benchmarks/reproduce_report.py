"""The report's experiments, reproduced: its networks with its recipe, beside its own logs.

    python benchmarks/reproduce_report.py --data-dir ../shared/data/cifar10-jpeg.tar.gz \\
        --models seed-googlenet seed-googlenet:fix_3x3=true seed-naive --json repro.json

For every model (``NAME`` or ``NAME:KEY=VALUE,...``) this trains the network with the
``seed`` recipe (the report's Keras runs: Adam 1e-3, batch 32, no augmentation, every head
weighted 1.0) for the report's epochs, or ``--epochs``, then evaluates on the test set both
the final weights (what the report's ``model.evaluate`` measured) and ``best.pt`` (once,
when the last epoch was the best). Its run
folder is ``--out-dir/NAME[...]``: a run that was stopped (Ctrl-C, kill, the end of a
sitting) is resumed where it stopped, and a finished one is only evaluated, so a long
reproduction can be done in several sittings with the same command. ``--no-train`` only
tests and tabulates what the run folders hold (runs made with different ``--epochs``, or
left part of the way).

Printed: per epoch, the report's train and validation loss and accuracy beside ours, and the
seconds per epoch of each (the report's on its unknown hardware, ours on this machine); then
the test results, with the loss the report printed as an accuracy ("94.44%" for GoogLeNet
is its main head's test loss, 0.9444) beside our loss. ``--recipe default`` trains the same
networks with the project's CIFAR recipe instead (augmentation, SGD one-cycle, smoothing).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from _common import (
    command_line,
    describe,
    environment,
    parse_settings,
    run_script,
    write_json,
)
from throughput import parse_spec

from cifar_inception.augment import normalize
from cifar_inception.data import load_dataset, split_train_val
from cifar_inception.devices import pick_device
from cifar_inception.errors import CifarInceptionError
from cifar_inception.evaluation import evaluate
from cifar_inception.fileio import append_jsonl
from cifar_inception.recipes import build_config
from cifar_inception.runs import RunFolder, read_history
from cifar_inception.summary import build_on_meta
from cifar_inception.training import resume_config, train
from cifar_inception.training.setup import SPLIT_SEED

# The report's own logs (../shared/seed/000_8473259bbac85932.txt), as printed there. Per
# epoch: (train loss, train acc, val loss, val acc, seconds). For the Inception v2 run the
# train loss is Keras' total (main + both auxiliary heads), the rest is the main head's.
REPORT: dict[str, dict[str, Any]] = {
    "seed-naive": {
        "epochs": 10, "split": "40,000 / 10,000",
        "log": [(1.8379, 0.3395, 1.6550, 0.4111, 222), (1.5573, 0.4449, 1.4866, 0.4762, 212),
                (1.4143, 0.4927, 1.3949, 0.5068, 211), (1.3176, 0.5305, 1.3100, 0.5325, 211),
                (1.2406, 0.5557, 1.2676, 0.5540, 211), (1.1767, 0.5809, 1.2955, 0.5385, 211)],
        "test": "Test acc: 56.05% (an accuracy)", "test_acc": 0.5605, "test_loss": None,
        "note": "the log stops in epoch 7 of 10; the test figure is of those weights",
    },
    "seed-googlenet": {
        "epochs": 10, "split": "not printed", "log": [],
        "test": "Test loss3_classifier_act_loss: 94.44% (a loss: 0.9444)",
        "test_acc": None, "test_loss": 0.9444,
        "note": "no training log; its '3x3' convolutions are 1x1 kernels (fix_3x3 corrects them)",
    },
    "seed-inception-v2": {
        "epochs": 25, "split": "45,000 / 5,000",
        "log": [(2.1086, 0.2259, 2.0959, 0.2504, 1221), (1.8816, 0.3799, 1.7787, 0.3479, 1213),
                (1.6195, 0.4480, 1.7269, 0.3858, 1217), (1.5882, 0.4836, 1.5171, 0.4548, 1219),
                (1.4846, 0.5377, 1.3459, 0.5362, 1218), (1.3215, 0.5539, 1.2158, 0.5672, 1218),
                (1.1796, 0.5825, 1.3076, 0.5332, 1218), (1.1099, 0.6090, 1.3094, 0.5434, 1218),
                (1.1338, 0.6296, 1.2195, 0.5758, 1219), (1.0711, 0.6543, 1.0518, 0.6358, 1221),
                (1.0583, 0.6793, 1.1399, 0.5552, 1222), (0.9687, 0.6949, 1.4228, 0.5634, 1224),
                (0.9514, 0.7142, 1.0789, 0.6328, 1205)],
        # Per epoch, the auxiliary heads' validation: (aux 1 loss, aux 1 acc, aux 2 loss,
        # aux 2 acc); epoch 12's line lacks the second head's loss.
        "aux_log": [(2.0856, 0.2476, 2.1148, 0.2298), (1.8293, 0.3380, 1.7440, 0.3372),
                    (1.7790, 0.3642, 1.7888, 0.3634), (1.5384, 0.4434, 1.5364, 0.4378),
                    (1.4730, 0.4718, 1.4388, 0.4792), (1.3929, 0.4878, 1.3264, 0.5152),
                    (1.4134, 0.4852, 1.3792, 0.5034), (1.3709, 0.5114, 1.3622, 0.5088),
                    (1.3326, 0.5266, 1.3435, 0.5258), (1.2683, 0.5512, 1.1889, 0.5634),
                    (1.2881, 0.5396, 1.3028, 0.5528), (1.3488, 0.5870, None, 0.5478),
                    (1.1898, 0.5746, 1.1283, 0.6188)],
        "test": "Test output_loss: 71.70% (a loss: 0.7170)", "test_acc": None,
        "test_loss": 0.7170, "note": "the log stops after epoch 13 of 25",
    },
}


def run_name(spec: str) -> str:
    """A folder name for a model spec: ``seed-googlenet:fix_3x3=true`` ->
    ``seed-googlenet-fix_3x3-true``."""
    return spec.replace(":", "-").replace("=", "-").replace(",", "-")


HEADS_FILE = "heads.jsonl"  # per epoch, every head's validation loss and accuracy


@torch.no_grad()
def head_validation(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    mean: Any, std: Any, batch_size: int = 250) -> list[dict[str, float]]:
    """Validation loss and accuracy of each head (the main one first), in eval mode."""
    was_training = model.training
    model.eval()
    sums = None
    for start in range(0, len(labels), batch_size):
        x = normalize(images[start:start + batch_size], mean, std)
        y = labels[start:start + batch_size]
        outputs = model.all_heads(x)
        batch = [(float(F.cross_entropy(logits, y, reduction="sum")),
                  float((logits.argmax(1) == y).sum()))
                 for logits in (outputs.logits, *outputs.aux_logits)]
        sums = batch if sums is None else [(a + c, b + d) for (a, b), (c, d) in zip(sums, batch)]
    model.train(was_training)
    return [{"val_loss": loss / len(labels), "val_acc": correct / len(labels)}
            for loss, correct in sums]


def heads_recorder(folder: Path, data: Any, val_size: int, batch_size: int) -> Any:
    """An ``epoch_end`` for train(): each epoch, every head's validation into heads.jsonl
    (the report logs all three heads of its Inception v2)."""
    _, _, val_x, val_y = split_train_val(data.train_images, data.train_labels,
                                         val_size=val_size, seed=SPLIT_SEED)
    images, labels = torch.as_tensor(val_x), torch.as_tensor(val_y).long()

    def record(row: dict[str, Any], model: torch.nn.Module, mean: Any, std: Any) -> None:
        heads = head_validation(model, images, labels, mean, std, batch_size)
        append_jsonl(folder / HEADS_FILE, {"epoch": row["epoch"], "heads": heads})

    return record


def has_aux_heads(model_name: str, options: dict[str, Any]) -> bool:
    """Whether the network has auxiliary heads (built on the meta device: no memory)."""
    return bool(getattr(build_on_meta(model_name, **options), "aux_taps", None))


def train_or_resume(spec: str, folder: Path, args: argparse.Namespace,
                    settings: dict[str, Any]) -> None:
    """Train ``spec`` to its epochs in ``folder``, continuing what an earlier call left;
    a network with auxiliary heads records every head's validation each epoch."""
    model, options = parse_spec(spec)
    epochs = args.epochs or REPORT.get(model, {}).get("epochs") or 10
    runtime = {"epochs": epochs, "device": args.device}
    if args.threads:
        runtime["num_threads"] = args.threads
    if (folder / "last.pt").is_file():
        config = resume_config(folder, **runtime)
        done = len(read_history(folder))
        if done >= epochs:
            print(f"{spec}: all {epochs} epochs done in {folder}; evaluating", flush=True)
            return
        print(f"{spec}: resuming {folder} after epoch {done}", flush=True)
        resume = folder
    else:
        config = build_config(model, args.recipe, model_options=options, out_dir=args.out_dir,
                              name=folder.name, data_dir=args.data_dir, download=args.download,
                              test=False, **{**settings, **runtime})
        resume = None
    data, epoch_end = None, None  # train() loads the data itself unless given it
    if has_aux_heads(model, options):
        data = load_dataset(config.dataset, config.data_dir, download=config.download)
        epoch_end = heads_recorder(folder, data, config.val_size, config.eval_batch_size)
    result = train(config, data, resume=resume, epoch_end=epoch_end)
    if result.status != "completed":
        raise SystemExit(f"{spec}: {result.message}")


def epoch_rows(spec: str, folder: Path) -> list[dict[str, Any]]:
    model, _ = parse_spec(spec)
    ours = read_history(folder)
    heads = read_heads(folder)
    theirs = REPORT.get(model, {}).get("log", [])
    rows = []
    for epoch in range(1, max(len(ours), len(theirs)) + 1):
        row: dict[str, Any] = {"model": spec, "epoch": epoch}
        if epoch <= len(theirs):
            loss, acc, val_loss, val_acc, seconds = theirs[epoch - 1]
            row.update(report_train_loss=loss, report_train_acc=acc, report_val_loss=val_loss,
                       report_val_acc=val_acc, report_s=seconds)
        if epoch <= len(ours):
            r = ours[epoch - 1]
            row.update(train_loss=r["train_loss"], train_acc=r["train_acc"],
                       val_loss=r["val_loss"], val_acc=r["val_acc"], seconds=r["seconds"])
        row.update(aux_columns(epoch, REPORT.get(model, {}).get("aux_log", []),
                               heads.get(epoch)))
        rows.append(row)
    return rows


def read_heads(folder: Path) -> dict[int, list[dict[str, float]]]:
    """heads.jsonl by epoch (the last line of an epoch written twice wins)."""
    path = folder / HEADS_FILE
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {line["epoch"]: line["heads"] for line in lines}


def aux_columns(epoch: int, theirs: list[tuple], ours: list[dict[str, float]] | None
                ) -> dict[str, Any]:
    """The auxiliary heads' validation accuracy, the report's beside ours, where known."""
    columns: dict[str, Any] = {}
    if epoch <= len(theirs):
        _, acc1, _, acc2 = theirs[epoch - 1]
        columns.update(report_aux1_val_acc=acc1, report_aux2_val_acc=acc2)
    if ours:
        for index, head in enumerate(ours[1:], start=1):
            columns[f"aux{index}_val_acc"] = head["val_acc"]
    return columns


def same_weights(first: Path, second: Path) -> bool:
    """Whether two checkpoints hold the same weights, as last.pt and best.pt do when a run's
    last epoch was its best (loading both takes seconds; a test pass of Inception v2 on the
    CPU takes minutes)."""
    from cifar_inception.checkpoint import load_checkpoint

    ours, theirs = (load_checkpoint(path)["state_dict"] for path in (first, second))
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def earlier_test(checkpoint: Path) -> dict[str, Any] | None:
    """The test result that ``evaluate`` wrote for ``checkpoint`` after it was last saved
    (the training call's own, or an earlier tabulation's), else None: testing Inception v2
    on the CPU takes minutes, and the same weights give the same result."""
    run = RunFolder.holding(checkpoint)
    evaluation = run.eval_for(checkpoint)
    if evaluation is None or evaluation.get("tta") or \
            run.eval.stat().st_mtime < checkpoint.stat().st_mtime:
        return None
    print(f"{checkpoint}: its test, written {run.eval.name} after it was saved, is reused",
          flush=True)
    return evaluation


def test_row(spec: str, folder: Path, data_dir: str | None, device: str) -> dict[str, Any]:
    model, _ = parse_spec(spec)
    best = earlier_test(folder / "best.pt") or evaluate(folder / "best.pt", data_dir=data_dir,
                                                        device=device)
    final = (best if same_weights(folder / "last.pt", folder / "best.pt") else
             evaluate(folder / "last.pt", data_dir=data_dir, device=device, write=False))
    report = REPORT.get(model, {})
    return {"model": spec, "epochs": len(read_history(folder)),
            "report_printed": report.get("test", "-"),
            "test_acc_final": final["test_top1"], "test_loss_final": final["test_loss"],
            "test_acc_best": best["test_top1"], "test_loss_best": best["test_loss"]}


EPOCH_COLUMNS = ("model", "epoch", "report_train_loss", "train_loss", "report_train_acc",
                 "train_acc", "report_val_loss", "val_loss", "report_val_acc", "val_acc",
                 "report_s", "seconds")
AUX_COLUMNS = ("model", "epoch", "report_val_acc", "val_acc", "report_aux1_val_acc",
               "aux1_val_acc", "report_aux2_val_acc", "aux2_val_acc")
TEST_COLUMNS = ("model", "epochs", "report_printed", "test_acc_final", "test_loss_final",
                "test_acc_best", "test_loss_best")
# The printed tables' headings, as docs/reproduction.md has them: each of our columns
# follows the report's of the same figure.
HEADINGS = {"model": "network", "report_train_loss": "report: train loss",
            "report_train_acc": "report: train acc", "report_val_loss": "report: val loss",
            "report_val_acc": "report: val acc", "report_s": "report: seconds",
            "report_aux1_val_acc": "report: aux 1 val acc",
            "report_aux2_val_acc": "report: aux 2 val acc",
            "report_printed": "what the report printed",
            "test_acc_final": "test acc (final)", "test_loss_final": "test loss (final)",
            "test_acc_best": "test acc (best.pt)", "test_loss_best": "test loss (best.pt)"}


def cell(column: str, value: Any) -> str:
    """One figure as the page shows it: accuracies in percent, losses to 3 decimals (4 for
    a test), seconds to 0.1 (the report's whole)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column == "model":
        return f"`{value}`"
    if column.endswith("_acc") or column.startswith("test_acc"):
        return f"{100 * value:.2f}%"
    if column.startswith("test_loss"):
        return f"{value:.4f}"
    if column.endswith("_loss"):
        return f"{value:.3f}"
    if column == "seconds":
        return f"{value:.1f}"
    return str(value)


def page_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """A Markdown table of ``rows`` as docs/reproduction.md shows them: after a column of
    the report's, ours of the same figure is headed "ours"."""
    def report_column(column: str) -> str:
        return "report_s" if column == "seconds" else f"report_{column}"

    headings = [("ours" if report_column(c) in columns else HEADINGS.get(c, c))
                for c in columns]
    aligned = ["---" if c in ("model", "report_printed") else "---:" for c in columns]
    lines = ["| " + " | ".join(headings) + " |", "|" + "|".join(aligned) + "|"]
    lines += ["| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(sets: dict[str, list[dict[str, Any]]], path: str) -> Path:
    """One figure: validation accuracy per epoch, the report's (dashed) beside ours, one
    colour per network, one line style per recipe (seed solid, default dotted). ``sets``:
    recipe -> epoch rows (:func:`with_this_call`)."""
    from matplotlib.figure import Figure

    from cifar_inception.fileio import atomic_write_bytes

    figure = Figure(figsize=(7.5, 4.5))
    axes = figure.add_subplot()
    networks = list(dict.fromkeys(r["model"] for rows in sets.values() for r in rows))
    colour = {spec: f"C{index}" for index, spec in enumerate(networks)}
    drawn_report = set()
    for recipe, rows in sets.items():
        style = {"seed": "-", "default": ":"}.get(recipe, "-.")
        for spec in dict.fromkeys(r["model"] for r in rows):
            ours = [(r["epoch"], 100 * r["val_acc"]) for r in rows
                    if r["model"] == spec and "val_acc" in r]
            if ours:
                axes.plot(*zip(*ours), style, marker="o", markersize=3, color=colour[spec],
                          label=f"{spec} (ours, {recipe} recipe)")
            theirs = [(r["epoch"], 100 * r["report_val_acc"]) for r in rows
                      if r["model"] == spec and "report_val_acc" in r]
            if theirs and spec not in drawn_report:
                drawn_report.add(spec)
                axes.plot(*zip(*theirs), "--", marker="x", markersize=3, color=colour[spec],
                          alpha=0.7, label=f"{spec} (report)")
    axes.set(xlabel="epoch", ylabel="validation accuracy (%)",
             title="The report's networks: the report's logs (dashed) and ours")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=6.5)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=120,
                   bbox_inches="tight")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def earlier_results(paths: list[str]) -> dict[str, list[dict[str, Any]]]:
    """recipe -> epoch rows of results files this script wrote before (``--json``)."""
    sets: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        try:
            saved = json.loads(Path(path).read_text())
            sets.setdefault(saved["recipe"], []).extend(saved["epochs"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CifarInceptionError(f"--plot-with {path}: not a results file of this "
                                      f"script ({exc})") from None
    return sets


def with_this_call(sets: dict[str, list[dict[str, Any]]], recipe: str,
                   epochs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Earlier results with this call's rows added: a network this call tabulates replaces
    its earlier rows of the same recipe (a longer run of it, or one on another machine), so
    that no curve is drawn twice."""
    ours = {r["model"] for r in epochs}
    kept = [r for r in sets.get(recipe, []) if r["model"] not in ours]
    return {**sets, recipe: [*kept, *epochs]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = parse_settings(args.set)
    sets = earlier_results(args.plot_with)  # read first: a bad file fails before any work
    env = environment(pick_device(args.device))
    print(f"{describe(env)}; recipe {args.recipe}", flush=True)
    epochs, tests = [], []
    for spec in args.models:
        folder = Path(args.out_dir) / run_name(spec)
        if args.train:
            train_or_resume(spec, folder, args, settings)
        elif not (folder / "last.pt").is_file():
            print(f"{spec}: no run in {folder} yet; left out (--no-train)", flush=True)
            continue
        epochs += epoch_rows(spec, folder)
        tests.append(test_row(spec, folder, args.data_dir, args.device))
    result = {"benchmark": "reproduce_report", "environment": env,
              "command": command_line(sys.argv), "recipe": args.recipe, "epochs": epochs,
              "tests": tests,
              "report_notes": {m: r["note"] for m, r in REPORT.items()}}
    write_json(args.json, result)
    if args.plot:
        print(f"figure: {plot_curves(with_this_call(sets, args.recipe, epochs), args.plot)}")
    print(f"\nThe report's runs beside ours (recipe {args.recipe}, JPEG copy if the data is); "
          f"{describe(env)}")
    print(page_table(epochs, EPOCH_COLUMNS))
    with_heads = [r for r in epochs if any(k.startswith(("aux", "report_aux")) for k in r)]
    if with_heads:
        print("\nEvery head's validation accuracy (main, auxiliary 1, auxiliary 2)")
        print(page_table(with_heads, AUX_COLUMNS))
    print("\nTest set: the final weights (as the report evaluated) and best.pt")
    print(page_table(tests, TEST_COLUMNS))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", metavar="SPEC",
                        default=["seed-googlenet", "seed-googlenet:fix_3x3=true", "seed-naive"])
    parser.add_argument("--recipe", default="seed")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs for every model (default: the report's)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-train: train nothing, only test and tabulate the runs "
                             "that --out-dir holds, as far as each has gone")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training option (repeatable)")
    parser.add_argument("--out-dir", default="runs/reproduce")
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--plot", default=None, metavar="PATH",
                        help="draw the validation accuracy per epoch, the report's and ours")
    parser.add_argument("--plot-with", nargs="+", default=[], metavar="JSON",
                        help="results files of earlier calls (--json) to draw beside these "
                             "in --plot (another recipe, networks trained elsewhere); a "
                             "network this call tabulates replaces its rows of this recipe")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_script("reproduce_report", build_parser(), run, argv)


if __name__ == "__main__":
    main()
