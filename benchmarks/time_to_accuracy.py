"""Time to accuracy: train a recipe for n seeds, following test accuracy against training time.

    python benchmarks/time_to_accuracy.py --recipe cpu10 --seeds 3 \\
        --data-dir ../shared/data/cifar10-jpeg.tar.gz --json /tmp/tta-cpu10.json
    python benchmarks/time_to_accuracy.py --recipe fast --seeds 5 --data-dir DATA \\
        --set epochs=8                   # any training option
    python benchmarks/time_to_accuracy.py --recipe fast --seeds 2 --data-dir DATA \\
        --ablate no-lookahead:lookahead=false no-tta:tta=false   # the recipe, then each variant

Each seed is a normal ``cifar_inception.training`` run (its run folder goes under ``--out-dir``).
After every epoch the current weights are evaluated on the test set; that evaluation is not
counted as training time. Training time is the sum of the epochs' ``seconds`` (the training
steps and the per-epoch validation; the data is loaded once, before any timing, and the
first epoch includes any compilation). The last epoch's test accuracy uses the recipe's
test-time augmentation (``tta``); earlier ones use it too with ``--tta-every-epoch``
(default on CUDA, where it is cheap; off on the CPU, where it would double the run).

Reported per seed and as mean and sample standard deviation over the seeds:

- ``final``: test accuracy at the end of the run;
- ``at_<T>s``: test accuracy of the last epoch finished within T seconds of training;
- ``to_<A>``: training seconds until the test accuracy first reached A (None: never).

With ``--ablate``, the recipe runs first, then each variant (``LABEL:KEY=VALUE,...``, the
recipe with those options changed), all with the same seeds, and one table compares them.
``--test-limit N`` evaluates on a seeded random N of the test images (quick checks only).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    command_line,
    describe,
    environment,
    format_table,
    mean_spread,
    parse_settings,
    pick_device,
    run_script,
    write_json,
)

from cifar_inception.evaluation import classification_metrics, log_probabilities
from cifar_inception.recipes import TrainConfig, build_config, get_recipe
from cifar_inception.training import train
from cifar_inception.training.setup import autocast_for, uses_channels_last

DEFAULT_CHECKPOINTS = {"cpu": (120.0, 300.0, 600.0), "cuda": (2.0, 3.0, 5.0, 10.0)}
DEFAULT_TARGETS = (0.90, 0.92, 0.94)


class TestTracker:
    """The epoch-end hook: test accuracy of the current weights, and the training time so far."""

    def __init__(self, data: Any, config: TrainConfig, device: torch.device, tta_every: bool):
        self.images = torch.as_tensor(data.test_images)
        self.labels = torch.as_tensor(data.test_labels)
        self.classes = data.classes
        self.config = config
        self.device = device
        self.tta_every = tta_every
        self.points: list[dict[str, Any]] = []
        self.train_seconds = 0.0
        # This process's CPU time not spent training (loading, evaluating): on a busy machine
        # the training's CPU time is what it would take alone, where wall time is not.
        self.cpu_spent_elsewhere = time.process_time()

    def __call__(self, row: dict[str, Any], model: torch.nn.Module, mean: Any, std: Any) -> None:
        self.train_seconds += row["seconds"]
        cpu_started = time.process_time()
        last = row["epoch"] == self.config.epochs
        tta = bool(getattr(self.config, "tta", False)) and (last or self.tta_every)
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with autocast_for(self.config, self.device):  # the run's precision and layout
                log_probs = log_probabilities(
                    model, self.images, mean, std, device=self.device,
                    batch_size=self.config.eval_batch_size,
                    channels_last=uses_channels_last(self.config, self.device), **_tta(tta))
        finally:
            model.train(was_training)
        metrics = classification_metrics(log_probs, self.labels, self.classes)
        self.points.append({"epoch": row["epoch"], "train_seconds": round(self.train_seconds, 2),
                            "test_acc": metrics["test_top1"], "tta": tta,
                            "val_acc": row.get("val_acc"),
                            "eval_seconds": round(time.perf_counter() - started, 2),
                            "train_cpu_seconds": round(cpu_started - self.cpu_spent_elsewhere, 2)})
        self.cpu_spent_elsewhere += time.process_time() - cpu_started


def _tta(enabled: bool) -> dict[str, Any]:
    return {"tta": enabled} if enabled else {}


def summarise_seed(points: list[dict[str, Any]], checkpoints: tuple[float, ...],
                   targets: tuple[float, ...]) -> dict[str, Any]:
    summary: dict[str, Any] = {"final": points[-1]["test_acc"] if points else None,
                               "train_seconds": points[-1]["train_seconds"] if points else None,
                               "train_cpu_seconds": points[-1].get("train_cpu_seconds")
                               if points else None,
                               "epochs": len(points)}
    for limit in checkpoints:
        within = [p for p in points if p["train_seconds"] <= limit]
        summary[f"at_{limit:g}s"] = within[-1]["test_acc"] if within else None
    for target in targets:
        reached = next((p for p in points if p["test_acc"] >= target), None)
        summary[f"to_{target:.2f}"] = reached["train_seconds"] if reached else None
    return summary


def aggregate(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per metric: mean, spread, how many seeds have a value, and the values."""
    rows = []
    for key in per_seed[0]:
        values = [s[key] for s in per_seed]
        present = [v for v in values if v is not None]
        mean, spread = mean_spread(present)
        rows.append({"metric": key, "mean": mean, "std": spread,
                     "n": f"{len(present)}/{len(values)}",
                     "values": ", ".join("-" if v is None else f"{v:.4g}" for v in values)})
    return rows


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``no-lookahead:lookahead=false,epochs=9`` -> ("no-lookahead", {...})."""
    label, sep, pairs = spec.partition(":")
    if not sep or not label:
        raise SystemExit(f"--ablate {spec!r}: expected LABEL:KEY=VALUE[,KEY=VALUE...]")
    # commas inside a JSON value ({"a":1,"b":2}) belong to it, not between options
    parts = re.split(r",(?=[A-Za-z_][\w-]*=)", pairs)
    return label, parse_settings([p for p in parts if p])


def test_subset(data: Any, limit: int | None) -> Any:
    """The data with a seeded random ``limit`` of its test images (all when None)."""
    if limit is None or limit >= len(data.test_labels):
        return data
    pick = torch.randperm(len(data.test_labels), generator=torch.Generator().manual_seed(0))
    pick = pick[:limit].sort().values.numpy()
    return dataclasses.replace(data, test_images=data.test_images[pick],
                               test_labels=data.test_labels[pick])


def run_seeds(args: argparse.Namespace, label: str, settings: dict[str, Any], data: Any,
              device: torch.device, checkpoints: tuple[float, ...], targets: tuple[float, ...]
              ) -> dict[str, Any]:
    """Train ``args.seeds`` runs of the recipe with ``settings``; their summaries and table."""
    tta_every = args.tta_every_epoch if args.tta_every_epoch is not None \
        else device.type == "cuda"
    out_dir = Path(args.out_dir)
    per_seed, runs = [], []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        name = f"{args.recipe}-{label}-seed{seed}"
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name)  # a benchmark's scratch run, replaced each time
        config = build_config(args.model, args.recipe, cuda=device.type == "cuda", seed=seed,
                              data_dir=args.data_dir, out_dir=str(out_dir), name=name,
                              test=False, **{"device": str(device), **settings})
        tracker = TestTracker(data, config, device, tta_every)
        started = time.perf_counter()
        train(config, data, log=_quiet if args.quiet else None, epoch_end=tracker)
        summary = summarise_seed(tracker.points, checkpoints, targets)
        summary["wall_seconds"] = round(time.perf_counter() - started, 1)
        per_seed.append(summary)
        runs.append({"seed": seed, "config": config.to_dict(), "points": tracker.points,
                     "summary": summary})
        print(f"{label} seed {seed}: final test accuracy {100 * summary['final']:.2f}% after "
              f"{summary['train_seconds']:.1f}s of training", flush=True)
    return {"label": label, "settings": settings, "runs": runs, "table": aggregate(per_seed)}


def ablation_row(variant: dict[str, Any], targets: tuple[float, ...]) -> dict[str, Any]:
    table = {row["metric"]: row for row in variant["table"]}
    row = {"variant": variant["label"],
           "changes": ", ".join(f"{k}={v}" for k, v in variant["settings"].items()) or "-",
           "final_acc": table["final"]["mean"], "std": table["final"]["std"],
           "n": table["final"]["n"], "train_s": table["train_seconds"]["mean"]}
    for target in targets:
        key = f"to_{target:.2f}"
        row[key] = table[key]["mean"]
        row[f"{key}_n"] = table[key]["n"]
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    from cifar_inception.data import load_cifar10

    device = pick_device(args.device)
    recipe = get_recipe(args.recipe)
    base = parse_settings(args.set)
    checkpoints = tuple(args.checkpoints or DEFAULT_CHECKPOINTS[device.type])
    targets = tuple(args.targets)
    variants = [("recipe", base)]
    for spec in args.ablate or ():
        label, changes = parse_variant(spec)
        settings = {**base, **changes}
        if "model_options" in base and "model_options" in changes:
            settings["model_options"] = {**base["model_options"], **changes["model_options"]}
        variants.append((label, settings))
    data = load_cifar10(args.data_dir, download=args.download)  # loaded once, not timed
    data = test_subset(data, args.test_limit)
    results = [run_seeds(args, label, settings, data, device, checkpoints, targets)
               for label, settings in variants]
    env = environment(device)
    result = {"benchmark": "time_to_accuracy", "environment": env, "recipe": recipe.name,
              "recipe_description": recipe.description, "settings": base,
              "command": command_line(sys.argv), "seeds": args.seeds,
              "test_images": len(data.test_labels),
              "checkpoints_s": checkpoints, "targets": targets, "variants": results,
              "table": results[0]["table"]}
    title = (f"recipe {recipe.name}{' with ' + ' '.join(args.set) if args.set else ''}, "
             f"{args.seeds} seed(s), {len(data.test_labels)} test images; {describe(env)}")
    if len(results) > 1:
        result["ablation"] = [ablation_row(v, targets) for v in results]
        columns = ["variant", "changes", "final_acc", "std", "n", "train_s",
                   *[f"to_{t:.2f}" for t in targets]]
        print(f"\nAblation: {title}")
        print(format_table(result["ablation"], columns))
    write_json(args.json, result)
    print(f"\nTime to accuracy: {title}")
    print("test accuracy as fractions; times in seconds of training")
    print(format_table(result["table"], ("metric", "mean", "std", "n", "values")))
    return result


def _quiet(_line: str) -> None:
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="a named recipe, e.g. cpu10 or fast")
    parser.add_argument("--model", default=None, help="model (default: the recipe's own)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (runs)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 source (e.g. the archive)")
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training option (repeatable)")
    parser.add_argument("--checkpoints", type=float, nargs="+", default=None, metavar="SECONDS",
                        help="report the accuracy reached at these training times "
                             "(default: 120 300 600 on the CPU; 2 3 5 10 on CUDA)")
    parser.add_argument("--targets", type=float, nargs="+", default=DEFAULT_TARGETS,
                        metavar="ACC", help="report the time to these accuracies (fractions)")
    parser.add_argument("--tta-every-epoch", action=argparse.BooleanOptionalAction,
                        default=None, help="test-time augmentation at every epoch, not only "
                                           "the last (default: on CUDA only)")
    parser.add_argument("--ablate", nargs="+", default=None, metavar="LABEL:KEY=VALUE,...",
                        help="after the recipe, run each variant (the recipe with these "
                             "options changed) and compare")
    parser.add_argument("--test-limit", type=int, default=None, metavar="N",
                        help="evaluate on a seeded random N test images (quick checks)")
    parser.add_argument("--out-dir", default="/tmp/cifar-inception-benchmarks",
                        help="where the runs' folders go (replaced on each run)")
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_script("time_to_accuracy", build_parser(), run, argv)


if __name__ == "__main__":
    main()
