"""``cifar-inception train [MODEL] [--recipe NAME] [options]``: train, then test the best epoch."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cifar_inception.cli.common import add_command, add_data_args

DESCRIPTION = """\
Train a registered model on CIFAR-10 and evaluate its best epoch on the test set.

With neither MODEL nor --recipe, the recipe suits the hardware found: 'gpu' (the best
CIFAR-tuned model's full recipe) on CUDA, else 'cpu10' (the best Inception net that a
10-minute budget buys on this CPU: it measures this machine's speed, then fixes the number
of steps so that training, validation and the test end within the budget, counted from the
command's start). With only MODEL, the recipe is 'seed' for the report's seed-* networks
and 'default' for the others. Any option below overrides the recipe; --epochs replaces a
recipe's --budget.

On the CPU, bf16 autocast is used only where this CPU computes bf16 natively and faster
(AVX-512 BF16 or AMX), and every core this process may use gets a thread; the first line
says what was chosen. --cpu-amp/--no-cpu-amp and --threads override.

The run folder (--output/NAME) receives config.json, metrics.jsonl, last.pt, best.pt and
eval.json. --resume RUN continues an interrupted or paused run exactly where it stopped.
Ctrl-C finishes the current step, saves last.pt and exits with status 130.

Batch size and learning rate are global: under torchrun each of the N processes takes
batch/N images per step, so the optimisation is the same as in one process.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from cifar_inception.options import add_flags
    from cifar_inception.recipes import RECIPES, TrainConfig

    parser = add_command(
        subparsers, "train", run_train,
        help="train a model (default: one that suits this hardware), then test it",
        description=DESCRIPTION)
    parser.add_argument("model", metavar="MODEL", nargs="?", default=None,
                        help="registered model name (see `cifar-inception models`)")
    parser.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                        help="named set of hyperparameters (see --list-recipes)")
    parser.add_argument("--list-recipes", action="store_true",
                        help="print the recipes and their settings, then exit")
    parser.add_argument("--resume", metavar="RUN", default=None,
                        help="continue this run folder from its last.pt")
    parser.add_argument("--width", type=float, default=None, metavar="W",
                        help="channel-width multiplier (CIFAR-tuned models), e.g. 0.25")
    parser.add_argument("--option", dest="options", metavar="KEY=VALUE", action="append",
                        default=[], help="any model option, e.g. --option aux_logits=false "
                                         "(repeatable; see `cifar-inception models`)")
    add_data_args(parser)
    add_flags(parser, TrainConfig)  # one flag per TrainConfig option, from its declaration


def collect_overrides(args: argparse.Namespace) -> dict:
    """The options given on the command line, and only those (None means 'not given')."""
    from cifar_inception.errors import ModelError
    from cifar_inception.models.registry import parse_options
    from cifar_inception.options import given_options
    from cifar_inception.recipes import TrainConfig

    overrides = given_options(args, TrainConfig)
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.no_download:
        overrides["download"] = False
    options = parse_options(args.options)
    if args.width is not None:
        if "width" in options:
            raise ModelError("the width is given twice (--width and --option width=); give "
                             "one")
        options["width"] = args.width
    if options:
        overrides["model_options"] = options
    return overrides


def print_recipes() -> None:
    from cifar_inception.recipes import RECIPES

    for recipe in RECIPES.values():
        target = f" (model {recipe.model})" if recipe.model else ""
        print(f"{recipe.name}{target}: {recipe.description}")
        settings = ", ".join(f"{k}={v}" for k, v in recipe.settings.items())
        print(f"    {settings}")
        for model, extra in recipe.per_model.items():
            print(f"    {model}: " + ", ".join(f"{k}={v}" for k, v in extra.items()))


def launch(config: Any, resume: str | None = None, started_at: float | None = None) -> Any:
    """Train in this process, or, with --processes N, as N processes that this one starts
    and waits for (as torchrun would start them). ``started_at`` (``time.time()``): when the
    command began; a --budget counts from it."""
    from cifar_inception.training import (
        splits_into_processes,
        train,
        train_in_processes,
    )

    if splits_into_processes(config):
        return train_in_processes(config, resume=resume, started_at=started_at)
    return train(config, resume=resume, started_at=started_at)


def run_train(args: argparse.Namespace) -> int:
    if args.list_recipes:
        print_recipes()
        return 0
    import torch

    from cifar_inception.errors import CifarInceptionError
    from cifar_inception.recipes import build_config, get_recipe
    from cifar_inception.training import resume_config

    overrides = collect_overrides(args)
    if args.resume:
        if args.model or args.recipe:
            raise CifarInceptionError("--resume continues a run with its own model and "
                                      "recipe; give no MODEL or --recipe with it")
        config = resume_config(args.resume, **overrides)
        result = launch(config, resume=args.resume, started_at=args.started_at)
    else:
        device = overrides.get("device", "auto")
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        config = build_config(args.model, args.recipe, cuda=cuda, **overrides)
        if args.model is None and args.recipe is None:
            found = "a CUDA GPU" if cuda else "no GPU"
            print(f"no model or recipe given; found {found}, so recipe '{config.recipe}': "
                  f"{get_recipe(config.recipe).description}", flush=True)
        result = launch(config, started_at=args.started_at)
    if result.status == "interrupted":
        print(f"cifar-inception: {result.message}", file=sys.stderr)
        return 130
    return 0
