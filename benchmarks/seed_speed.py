"""How fast the report's recipe trains each of its networks, before and after each speed-up.

    python benchmarks/seed_speed.py --models seed-naive seed-googlenet \\
        seed-googlenet:fix_3x3=true --steps 20 --json seed-speed.json

The ``seed`` recipe (the report's Keras runs: Adam 1e-3, batch 32, every head weighted 1.0)
computes the same thing in every row; only how it runs changes, one step at a time:

1. ``before``: Adam's default (foreach) implementation, contiguous (NCHW) tensors, glibc's
   default allocator settings;
2. ``fused Adam``: the whole update in one pass per tensor (``fused=True``);
3. ``+ memory reuse``: freed blocks kept for the next step
   (:func:`cifar_inception.devices.reuse_freed_memory`) instead of page-faulted in again;
4. ``+ channels_last``: the convolutions in the layout the CPU's kernels prefer.

Each row runs in a fresh process (the allocator settings cannot be undone), on every core,
with ``--warmup`` untimed steps and then ``--steps`` timed ones of forward, loss, backward
and the optimiser step on random batches (the speed does not depend on the pixels). Printed:
milliseconds per step (median, min and max over the steps), images per second, and the
implied minutes per epoch of the report's split, training only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from _common import describe, environment, format_table, run_script, write_json
from throughput import parse_spec

SETTINGS = {  # row -> (fused Adam, memory reuse, channels_last)
    "before": (False, False, False),
    "fused Adam": (True, False, False),
    "+ memory reuse": (True, True, False),
    "+ channels_last": (True, True, True),
}


def time_steps(spec: str, row: str, steps: int, warmup: int, threads: int | None
               ) -> dict[str, Any]:
    """Seconds per training step of ``spec`` under the seed recipe, set up as ``row`` says."""
    from cifar_inception.devices import reuse_freed_memory
    from cifar_inception.models import create_model
    from cifar_inception.recipes import build_config
    from cifar_inception.training.optim import optimise, resolve_aux_weights

    fused, reuse, channels_last = SETTINGS[row]
    if threads:
        torch.set_num_threads(threads)
    if reuse:
        reuse_freed_memory()
    name, options = parse_spec(spec)
    config = build_config(name, "seed", model_options=options)
    torch.manual_seed(0)
    model = create_model(name, **options).train()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=fused)
    x = torch.randn(config.batch_size, 3, 32, 32).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (config.batch_size,))
    weights = resolve_aux_weights(config, model)
    seconds = []
    for index in range(warmup + steps):
        started = time.perf_counter()
        optimise(model, optimizer, x, y, weights, config.label_smoothing, torch.autocast(
            "cpu", enabled=False))
        if index >= warmup:
            seconds.append(time.perf_counter() - started)
    return {"model": spec, "setting": row, "batch": config.batch_size,
            "ms_median": 1000 * statistics.median(seconds), "ms_min": 1000 * min(seconds),
            "ms_max": 1000 * max(seconds), "steps": steps,
            "val_size": config.val_size, "threads": torch.get_num_threads()}


def one_row_in_a_fresh_process(spec: str, row: str, args: argparse.Namespace
                               ) -> dict[str, Any]:
    command = [sys.executable, __file__, "--one", spec, row, "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def with_epoch_time(row: dict[str, Any]) -> dict[str, Any]:
    images = 50000 - row["val_size"]
    row["img_s"] = row["batch"] / (row["ms_median"] / 1000)
    row["epoch_min"] = images / row["img_s"] / 60
    return row


COLUMNS = ("model", "setting", "threads", "batch", "ms_median", "ms_min", "ms_max", "img_s", "epoch_min")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.one:
        spec, row = args.one
        print(json.dumps(time_steps(spec, row, args.steps, args.warmup, args.threads)))
        return {}
    env = environment(torch.device("cpu"))
    print(describe(env), flush=True)
    rows = []
    for spec in args.models:
        for row in args.settings:
            rows.append(with_epoch_time(one_row_in_a_fresh_process(spec, row, args)))
            print(f"  {spec}, {row}: {rows[-1]['ms_median']:.0f} ms a step", flush=True)
    result = {"benchmark": "seed_speed", "environment": env, "command": sys.argv,
              "rows": rows}
    write_json(args.json, result)
    print(f"\nThe report's recipe, one training step (batch 32, Adam); {describe(env)}")
    print(format_table(rows, COLUMNS))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", metavar="SPEC",
                        default=["seed-naive", "seed-googlenet", "seed-googlenet:fix_3x3=true"])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS),
                        default=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--one", nargs=2, metavar=("SPEC", "SETTING"), help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, metavar="PATH")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_script("seed_speed", build_parser(), run, argv)


if __name__ == "__main__":
    main()
