"""A learning-rate range test: which peak learning rate a network takes under a recipe.

The learning rate grows geometrically from ``--start`` to ``--end`` over ``--steps`` of the
recipe's own training step (its optimiser, augmentation, auxiliary heads and label
smoothing), on the training split, and the script prints the smoothed training loss against
it. A recipe's peak should sit well below where the loss turns up (a common rule: a tenth of
the learning rate at the loss's minimum). Used to set the ``default`` recipe's learning rate
for the report's networks, which have no batch norm (docs/reproduction.md)::

    python benchmarks/lr_range.py --data-dir ../shared/data/cifar10-jpeg.tar.gz \\
        --model seed-googlenet --recipe default --steps 60 --json lr-range.json
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from typing import Any

import torch

from _common import describe, environment, format_table, pick_device, write_json
from throughput import parse_spec


def range_test(args: argparse.Namespace) -> dict[str, Any]:
    from cifar_inception import distributed
    from cifar_inception.recipes import build_config
    from cifar_inception.training.loop import prepare
    from cifar_inception.training.setup import seeded_generator
    from cifar_inception.training.step import train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    name, options = parse_spec(args.model)
    with tempfile.TemporaryDirectory() as out_dir:
        config = build_config(name, args.recipe, model_options=options, out_dir=out_dir,
                              data_dir=args.data_dir, device=device.type, epochs=1,
                              train_steps=args.steps, test=False, seed=args.seed,
                              num_threads=args.threads)
        run = prepare(config, None, None, distributed.context_from_environment(), device,
                      lambda line: print(line, flush=True))
        loop, data = run.loop, run.loop.prepared
        order = torch.randperm(data.train_x.shape[0], device=device,
                               generator=seeded_generator(device, config.seed, "order", 0))
        ratio = (args.end / args.start) ** (1 / max(1, args.steps - 1))
        rows, smoothed = [], None
        for step in range(args.steps):
            lr = args.start * ratio ** step
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            started = time.perf_counter()
            loss, _, _ = train_step(loop, data.train_x[index], data.train_y[index], lr=lr,
                                    generator=seeded_generator(device, config.seed, "augment",
                                                               0, step))
            value = float(loss.detach())
            smoothed = value if smoothed is None else 0.8 * smoothed + 0.2 * value
            rows.append({"step": step + 1, "lr": lr, "loss": value, "smoothed": smoothed,
                         "seconds": time.perf_counter() - started})
            print(f"step {step + 1:3d}  lr {lr:.4g}  loss {value:.4f}  smoothed {smoothed:.4f}",
                  flush=True)
            if not math.isfinite(value) or (step > 5 and smoothed > 4 * rows[0]["loss"]):
                break  # diverged: the rest of the range says nothing more
    best = min(rows, key=lambda r: r["smoothed"])
    return {"model": args.model, "recipe": args.recipe, "batch_size": config.batch_size,
            "rows": rows, "lowest": best, "suggested_peak": best["lr"] / 10}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default="seed-googlenet",
                        help="a model spec, options after a colon (seed-googlenet:fix_3x3=true)")
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--start", type=float, default=1e-4, help="first learning rate")
    parser.add_argument("--end", type=float, default=1.0, help="last learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the results here")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    env = environment(pick_device(args.device))
    print(describe(env), flush=True)
    result = {"environment": env, **range_test(args)}
    every = max(1, len(result["rows"]) // 12)
    shown = result["rows"][::every]
    print(format_table(shown, ["step", "lr", "loss", "smoothed"]))
    print(f"lowest smoothed loss {result['lowest']['smoothed']:.4f} at lr "
          f"{result['lowest']['lr']:.4g}; a tenth of it: {result['suggested_peak']:.4g} "
          f"(batch {result['batch_size']})")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
