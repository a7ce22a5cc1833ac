"""The Inception recipe against a plain baseline, side by side, at equal time and equal FLOPs.

    python benchmarks/budget_vs_baseline.py --data-dir ../shared/data/cifar10-jpeg.tar.gz \\
        --budgets 2m 5m 10m 20m --seeds 1 --json /tmp/budget-vs-baseline.json

For every budget, and every seed, on this machine in this one call:

1. **Inception**: ``--recipe`` (default ``cpu10``) on ``--model`` (default the recipe's own,
   ``inception-cpu``, with any ``--option KEY=VALUE``) with ``--budget B``, widened as the
   recipe says (``cpu10``: while the budget still buys 9 epochs) or ``--widen-for-epochs
   E``: it measures its speed, plans its steps, trains, validates after every epoch and
   tests best.pt (with the recipe's test-time augmentation).
2. **Baseline at equal time**: the same recipe, loop and tricks on ``--baseline``
   (``baseline-plain``: airbench94's network) with the same budget.
3. **Baseline at equal FLOPs** (unless ``--no-equal-flops``): the baseline trained for the
   steps that cost the training FLOPs of run 1 (training FLOPs: 3 x 2 x multiply-adds of a
   forward pass, per image trained), whatever time that takes.

Each run's wall time counts from the start of ``train()`` (the decoded data is in memory,
so loading is not counted; measuring and planning are). Printed per budget: test accuracy of
each (mean and sample standard deviation over the seeds), the ratio Inception / baseline,
the epochs, training FLOPs and wall and CPU seconds, and the load average. The hardware line
gives the CPU model and torch's capability string (and says when an older CPU is emulated
with ``ONEDNN_MAX_CPU_ISA``/``ATEN_CPU_CAPABILITY``).
"""

from __future__ import annotations

import argparse
import json
import os
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
    run_script,
    write_json,
)
from cifar_inception.devices import pick_device
from cifar_inception.models import create_model
from cifar_inception.models.registry import parse_options
from cifar_inception.options import parse_duration
from cifar_inception.recipes import build_config, get_recipe
from cifar_inception.summary import count_macs
from cifar_inception.training import train


def training_flops_per_image(model_name: str, model_options: dict) -> float:
    """Forward multiply-adds x 2 (FLOPs) x 3 (the backward pass costs about twice the forward)."""
    return 6.0 * count_macs(create_model(model_name, **model_options))


def one_run(args: argparse.Namespace, model: str | None, label: str, seed: int, data: Any,
            device: torch.device, **settings: Any) -> dict[str, Any]:
    """Train and test one run; what it cost and what it reached."""
    name = f"{label}-seed{seed}"
    out_dir = Path(args.out_dir)
    shutil.rmtree(out_dir / name, ignore_errors=True)  # a benchmark's scratch run
    config = build_config(model, args.recipe, cuda=device.type == "cuda", seed=seed,
                          out_dir=str(out_dir), name=name, device=str(device),
                          **{**parse_settings(args.set), **settings})
    lines: list[str] = []
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(config, data, log=lines.append)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    trained = len(data.train_labels) - config.val_size
    recorded = json.loads((result.run_dir / "config.json").read_text())["config"]
    steps = recorded["train_steps"] or recorded["epochs"] * (trained // config.batch_size)
    options = recorded["model_options"]  # as trained: --widen-for-epochs may have widened it
    flops = steps * config.batch_size * training_flops_per_image(config.model, options)
    row = {"run": label, "model": config.model, "model_options": options, "seed": seed,
           "test_acc": result.test["test_top1"], "epochs": steps * config.batch_size / trained,
           "steps": steps,
           "train_tflop": flops / 1e12, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
           "load": round(os.getloadavg()[0], 2), "first_lines": lines[:3]}
    print(f"  {label} seed {seed}: {100 * row['test_acc']:.2f}% test, {row['epochs']:.2f} "
          f"epochs, {row['train_tflop']:.1f} TFLOP, {wall:.0f} s wall, {cpu:.0f} s CPU",
          flush=True)
    return row


def budget_rows(args: argparse.Namespace, budget: float, data: Any, device: torch.device
                ) -> list[dict[str, Any]]:
    runs, tag = [], f"{budget:g}s"
    widen = {} if args.widen_for_epochs is None else {
        "widen_for_epochs": args.widen_for_epochs}  # else the recipe's (cpu10: 9)
    inception = dict(budget=budget, model_options=parse_options(args.option), **widen)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        ours = one_run(args, args.model, f"inception-{tag}", seed, data, device, **inception)
        runs.append(ours)
        runs.append(one_run(args, args.baseline, f"baseline-{tag}", seed, data, device,
                            budget=budget))
        if args.equal_flops:
            per_step = training_flops_per_image(args.baseline, {}) * _batch(args)
            steps = max(1, round(ours["train_tflop"] * 1e12 / per_step))
            runs.append(one_run(args, args.baseline, f"baseline-flops-{tag}", seed, data,
                                device, train_steps=steps))
    return runs


def _batch(args: argparse.Namespace) -> int:
    return build_config(args.baseline, args.recipe).batch_size


def summary_row(budget: float, runs: list[dict[str, Any]], label: str) -> dict[str, Any]:
    def of(prefix: str) -> list[dict[str, Any]]:
        return [r for r in runs if r["run"].startswith(prefix + "-") and
                not (prefix == "baseline" and r["run"].startswith("baseline-flops"))]

    ours, theirs = of("inception"), of(label)
    acc, acc_std = mean_spread([r["test_acc"] for r in ours])
    base, base_std = mean_spread([r["test_acc"] for r in theirs])
    return {"budget": f"{budget / 60:g} min", "comparison": "equal time" if label == "baseline"
            else "equal FLOPs",
            "inception_acc": acc, "inception_std": acc_std,
            "baseline_acc": base, "baseline_std": base_std,
            "ratio": acc / base if base else float("nan"),
            "n": len(ours),
            "inception_epochs": mean_spread([r["epochs"] for r in ours])[0],
            "baseline_epochs": mean_spread([r["epochs"] for r in theirs])[0],
            "inception_tflop": mean_spread([r["train_tflop"] for r in ours])[0],
            "baseline_tflop": mean_spread([r["train_tflop"] for r in theirs])[0],
            "inception_wall_s": mean_spread([r["wall_s"] for r in ours])[0],
            "baseline_wall_s": mean_spread([r["wall_s"] for r in theirs])[0],
            "max_load": max(r["load"] for r in ours + theirs)}


COLUMNS = ("budget", "comparison", "inception_acc", "inception_std", "baseline_acc",
           "baseline_std", "ratio", "n", "inception_epochs", "baseline_epochs",
           "inception_tflop", "baseline_tflop", "inception_wall_s", "baseline_wall_s",
           "max_load")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from cifar_inception.data import load_cifar10

    device = pick_device(args.device)
    budgets = [parse_duration(b) for b in args.budgets]
    data = load_cifar10(args.data_dir, download=args.download)  # decoded once, not timed
    env = environment(device)
    print(f"{describe(env)}; recipe {args.recipe}, {args.seeds} seed(s)", flush=True)
    table, runs = [], []
    for budget in budgets:
        print(f"budget {budget / 60:g} min:", flush=True)
        rows = budget_rows(args, budget, data, device)
        runs += rows
        table.append(summary_row(budget, rows, "baseline"))
        if args.equal_flops:
            table.append(summary_row(budget, rows, "baseline-flops"))
    result = {"benchmark": "budget_vs_baseline", "environment": env,
              "command": command_line(sys.argv), "recipe": args.recipe,
              "recipe_description": get_recipe(args.recipe).description,
              "seeds": args.seeds, "runs": runs, "table": table}
    write_json(args.json, result)
    widening = ("the recipe says" if args.widen_for_epochs is None
                else f"{args.widen_for_epochs:g} epochs allow")
    print(f"\nInception ({args.model or get_recipe(args.recipe).model} "
          f"{' '.join(args.option)}, widened as {widening}) against "
          f"{args.baseline}, recipe {args.recipe}, JPEG copy if the data is; {describe(env)}")
    print("test accuracy as fractions; ratio = Inception / baseline; wall seconds per run")
    print(format_table(table, COLUMNS))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", nargs="+", default=["2m", "5m", "10m", "20m"],
                        metavar="DURATION")
    parser.add_argument("--recipe", default="cpu10")
    parser.add_argument("--model", default=None, help="the Inception model (default: the "
                                                      "recipe's)")
    parser.add_argument("--option", metavar="KEY=VALUE", action="append", default=[],
                        help="an option of the Inception model (repeatable)")
    parser.add_argument("--widen-for-epochs", type=float, default=None, metavar="E",
                        help="the Inception runs widen their net while the budget still "
                             "buys E epochs (train's --widen-for-epochs; default: the "
                             "recipe's)")
    parser.add_argument("--baseline", default="baseline-plain")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training option of every run (repeatable)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--equal-flops", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-dir", default="/tmp/cifar-inception-benchmarks")
    parser.add_argument("--json", default=None, metavar="PATH")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_script("budget_vs_baseline", build_parser(), run, argv)


if __name__ == "__main__":
    main()
