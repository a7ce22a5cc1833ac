"""``cifar-inception train [MODEL] [--recipe NAME] [options]``: train, then test the best epoch."""

from __future__ import annotations

import argparse
import sys

from cifar_inception.cli.common import add_data_args

DESCRIPTION = """\
Train a registered model on CIFAR-10 and evaluate its best epoch on the test set.

With neither MODEL nor --recipe, the recipe suits the hardware found: 'gpu' (the best
CIFAR-tuned model's full recipe) on CUDA, else 'cpu10' (inception-cpu, about ten minutes on
a 2-core CPU). With only MODEL, the recipe is 'seed' for the report's seed-* networks and
'default' for the others. Any option below overrides the recipe.

The run folder (--output/NAME) receives config.json, metrics.jsonl, last.pt, best.pt and
eval.json. --resume RUN continues an interrupted or paused run exactly where it stopped.
Ctrl-C finishes the current step, saves last.pt and exits with status 130.
On a machine busy with other work, --threads 1 is often faster than one thread per core.

Batch size and learning rate are global: under torchrun each of the N processes takes
batch/N images per step, so the optimisation is the same as in one process.
"""

# cifar_inception.recipes.RECIPES, without importing it (torch) for --help
RECIPE_NAMES = ("seed", "default", "cpu", "gpu", "cpu10", "fast")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model (default: one that suits this hardware), then test it",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", nargs="?", default=None,
                        help="registered model name (see `cifar-inception models`)")
    parser.add_argument("--recipe", choices=RECIPE_NAMES, default=None,
                        help="named set of hyperparameters (see --list-recipes)")
    parser.add_argument("--list-recipes", action="store_true",
                        help="print the recipes and their settings, then exit")
    parser.add_argument("--resume", metavar="RUN", default=None,
                        help="continue this run folder from its last.pt")

    model = parser.add_argument_group("model")
    model.add_argument("--width", type=float, default=None, metavar="W",
                       help="channel-width multiplier (CIFAR-tuned models), e.g. 0.25")
    model.add_argument("--option", dest="options", metavar="KEY=VALUE", action="append",
                       default=[], help="any model option, e.g. --option aux_logits=false "
                                        "(repeatable; see `cifar-inception models`)")

    add_data_args(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--val-size", type=int, default=None, metavar="N",
                      help="training images held out for validation (0: none)")
    data.add_argument("--train-limit", type=int, default=None, metavar="N",
                      help="train on a fixed random subset of N images (quick runs)")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=None, metavar="N")
    opt.add_argument("--batch-size", type=int, default=None, metavar="N",
                     help="global batch size")
    opt.add_argument("--optimizer", choices=("sgd", "adamw", "adam"), default=None,
                     help="sgd (Nesterov momentum), adamw, or adam (as the report's Keras runs)")
    opt.add_argument("--lr", type=float, default=None, metavar="LR",
                     help="peak learning rate, for the global batch")
    opt.add_argument("--momentum", type=float, default=None, metavar="M",
                     help="SGD momentum; Adam's beta1")
    opt.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                     help="Nesterov momentum for SGD")
    opt.add_argument("--weight-decay", type=float, default=None, metavar="WD",
                     help="weight decay (never on norms and biases)")
    opt.add_argument("--schedule", choices=("onecycle", "cosine", "constant"), default=None,
                     help="per-step learning-rate schedule after the warm-up")
    opt.add_argument("--warmup-epochs", type=float, default=None, metavar="E",
                     help="linear warm-up length in epochs (fractions allowed)")
    opt.add_argument("--final-lr", type=float, default=None, metavar="F",
                     help="where the schedule ends, as a fraction of the peak (default 0)")
    opt.add_argument("--norm-bias-lr", type=float, default=None, metavar="X",
                     help="learning-rate multiplier for norm shifts and biases (default 1)")
    opt.add_argument("--label-smoothing", type=float, default=None, metavar="S")
    opt.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=None,
                     help="reset the weights to their moving average every few steps, and "
                          "end on it (airbench's lookahead)")
    opt.add_argument("--lookahead-steps", type=int, default=None, metavar="K")
    opt.add_argument("--lookahead-decay", type=float, default=None, metavar="D",
                     help="moving-average decay per step (ramped up over the run)")
    opt.add_argument("--whiten-init", action=argparse.BooleanOptionalAction, default=None,
                     help="set a whitening stem from the training images (models that "
                          "have one; default on)")
    opt.add_argument("--whiten-bias-epochs", type=float, default=None, metavar="E",
                     help="freeze the whitening stem's weights and train its bias for E "
                          "epochs")
    opt.add_argument("--aux-weights", type=float, nargs="+", default=None, metavar="W",
                     help="auxiliary-loss weights: one for every head, or one per head")

    aug = parser.add_argument_group("augmentation (on the device, in batches)")
    aug.add_argument("--crop-padding", type=int, default=None, metavar="P",
                     help="random crop after padding P pixels (0: no crop)")
    aug.add_argument("--padding-mode", choices=("reflect", "zeros"), default=None)
    aug.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                     help="random horizontal flip")
    aug.add_argument("--flip-mode", choices=("random", "alternate"), default=None,
                     help="random flips, or alternate: each image mirrored every other epoch")
    aug.add_argument("--cutout", type=int, default=None, metavar="S",
                     help="cutout square side (0: none)")

    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                     help="bf16 autocast on CUDA (default on)")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                     help="channels_last memory format on CUDA (default on)")
    run.add_argument("--cpu-amp", action=argparse.BooleanOptionalAction, default=None,
                     help="bf16 autocast on the CPU (fast with AVX-512 BF16 or AMX)")
    run.add_argument("--cpu-channels-last", action=argparse.BooleanOptionalAction,
                     default=None, help="channels_last memory format on the CPU")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="torch.compile the model")
    run.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                     help="synchronise batch-norm statistics across processes (torchrun, CUDA)")
    run.add_argument("--threads", dest="num_threads", type=int, default=None, metavar="N",
                     help="CPU threads per process (default: all cores, shared among ranks)")
    run.add_argument("--eval-batch-size", type=int, default=None, metavar="N")
    run.add_argument("--output", dest="out_dir", default=None, metavar="DIR",
                     help="folder that receives the run folders (default: runs)")
    run.add_argument("--name", default=None, help="run folder name (default: MODEL-DATE-TIME)")
    run.add_argument("--stop-after-epochs", type=int, default=None, metavar="N",
                     help="pause once N epochs are done; continue later with --resume")
    run.add_argument("--test", action=argparse.BooleanOptionalAction, default=None,
                     help="evaluate best.pt on the test set at the end (default on)")
    run.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                     help="test-time augmentation in that evaluation (flips and shifts)")
    run.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                     help="how long a process waits for the others under torchrun (600)")
    parser.set_defaults(func=run_train)


# options whose command-line name differs from nothing else: copied as given
_PLAIN = ("val_size", "train_limit", "epochs", "batch_size", "optimizer", "lr", "momentum",
          "nesterov", "weight_decay", "schedule", "warmup_epochs", "label_smoothing",
          "crop_padding", "padding_mode", "flip", "cutout", "seed", "device", "amp",
          "channels_last", "compile", "sync_bn", "num_threads", "eval_batch_size", "out_dir",
          "name", "stop_after_epochs", "test", "dist_timeout", "data_dir", "final_lr",
          "norm_bias_lr", "lookahead", "lookahead_steps", "lookahead_decay", "whiten_init",
          "whiten_bias_epochs", "flip_mode", "cpu_amp", "cpu_channels_last", "tta")


def collect_overrides(args: argparse.Namespace) -> dict:
    """The options given on the command line, and only those (None means 'not given')."""
    from cifar_inception.models.registry import parse_options

    overrides = {key: getattr(args, key) for key in _PLAIN if getattr(args, key) is not None}
    if args.no_download:
        overrides["download"] = False
    if args.aux_weights is not None:
        weights = args.aux_weights
        overrides["aux_weights"] = weights[0] if len(weights) == 1 else list(weights)
    options = parse_options(args.options)
    if args.width is not None:
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


def run_train(args: argparse.Namespace) -> int:
    if args.list_recipes:
        print_recipes()
        return 0
    import torch

    from cifar_inception.errors import CifarInceptionError
    from cifar_inception.recipes import build_config, get_recipe
    from cifar_inception.training import resume_config, train

    overrides = collect_overrides(args)
    if args.resume:
        if args.model or args.recipe:
            raise CifarInceptionError("--resume continues a run with its own model and "
                                      "recipe; give no MODEL or --recipe with it")
        config = resume_config(args.resume, **overrides)
        result = train(config, resume=args.resume)
    else:
        device = overrides.get("device", "auto")
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        config = build_config(args.model, args.recipe, cuda=cuda, **overrides)
        if args.model is None and args.recipe is None:
            found = "a CUDA GPU" if cuda else "no GPU"
            print(f"no model or recipe given; found {found}, so recipe '{config.recipe}': "
                  f"{get_recipe(config.recipe).description}", flush=True)
        result = train(config)
    if result.status == "interrupted":
        print(f"cifar-inception: {result.message}", file=sys.stderr)
        return 130
    return 0
