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
4. ``+ channels_last``: the convolutions in the layout the CPU's kernels prefer (oneDNN's
   blocked NHWC kernels);
5. ``+ bf16``: bf16 autocast, which the ``seed`` recipe uses only on a CPU that computes
   bf16 natively (elsewhere it is emulated and slower, so the row is skipped and says so).

``--profile``: one step of the last setting under ``torch.profiler``: the operators that
cost most, by their own CPU time. ``--eval-batches 32 256 1024``: the validation's
images/s at each batch size (eval mode, no gradients, the last setting's layout), since
every epoch ends with 5,000 validation images.

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
from collections.abc import Callable
from typing import Any

import torch

from _common import command_line, describe, environment, format_table, run_script, write_json
from cifar_inception.devices import has_native_bf16
from throughput import parse_spec

SETTINGS = {  # row -> (fused Adam, memory reuse, channels_last, bf16 autocast)
    "before": (False, False, False, False),
    "fused Adam": (True, False, False, False),
    "+ memory reuse": (True, True, False, False),
    "+ channels_last": (True, True, True, False),
    "+ bf16": (True, True, True, True),
}


def time_steps(spec: str, row: str, steps: int, warmup: int, threads: int | None,
               profile: bool = False, eval_batches: list[int] | None = None) -> dict[str, Any]:
    """Seconds per training step of ``spec`` under the seed recipe, set up as ``row`` says."""
    from cifar_inception.devices import reuse_freed_memory
    from cifar_inception.models import create_model
    from cifar_inception.recipes import build_config
    from cifar_inception.training.optim import optimise, resolve_aux_weights

    fused, reuse, channels_last, bf16 = SETTINGS[row]
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

    def step() -> None:
        optimise(model, optimizer, x, y, weights, config.label_smoothing,
                 torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16))

    seconds = []
    for index in range(warmup + steps):
        started = time.perf_counter()
        step()
        if index >= warmup:
            seconds.append(time.perf_counter() - started)
    result = {"model": spec, "setting": row, "batch": config.batch_size,
              "ms_median": 1000 * statistics.median(seconds), "ms_min": 1000 * min(seconds),
              "ms_max": 1000 * max(seconds), "steps": steps,
              "val_size": config.val_size, "threads": torch.get_num_threads()}
    if profile:
        result["operators"] = profile_step(step)
    if eval_batches:
        result["eval"] = evaluation_rates(model.eval(), layout, bf16, eval_batches)
    return result


def profile_step(step: Callable[[], None], count: int = 12) -> list[dict[str, Any]]:
    """The operators of one step that cost most, by their own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if not e.key.startswith("autograd::engine")]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"operator": e.key, "calls": e.count,
             "self_ms": round(e.self_cpu_time_total / 1e3, 1),
             "share": f"{100 * e.self_cpu_time_total / total:.1f}%"} for e in events[:count]]


@torch.no_grad()
def evaluation_rates(model: torch.nn.Module, layout: torch.memory_format, bf16: bool,
                     batches: list[int]) -> list[dict[str, Any]]:
    """Validation images/s at each batch size (one untimed batch, then two timed)."""
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=layout)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x)
            started = time.perf_counter()
            for _ in range(2):
                model(x)
        rows.append({"eval_batch": batch, "img_s": 2 * batch / (time.perf_counter() - started)})
    return rows


def one_row_in_a_fresh_process(spec: str, row: str, args: argparse.Namespace
                               ) -> dict[str, Any]:
    command = [sys.executable, __file__, "--one", spec, row, "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if row == args.settings[-1]:  # the profile and the evaluation batches: of the last row
        command += ["--profile"] if args.profile else []
        command += ["--eval-batches", *map(str, args.eval_batches)] if args.eval_batches else []
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
        print(json.dumps(time_steps(spec, row, args.steps, args.warmup, args.threads,
                                    args.profile, args.eval_batches)))
        return {}
    env = environment(torch.device("cpu"))
    print(describe(env), flush=True)
    if "+ bf16" in args.settings and not has_native_bf16():
        args.settings = [row for row in args.settings if row != "+ bf16"]
        print("  + bf16: skipped, this CPU has no native bf16 (emulated bf16 is slower than "
              "fp32)", flush=True)
    rows = []
    for spec in args.models:
        for row in args.settings:
            rows.append(with_epoch_time(one_row_in_a_fresh_process(spec, row, args)))
            print(f"  {spec}, {row}: {rows[-1]['ms_median']:.0f} ms a step", flush=True)
    result = {"benchmark": "seed_speed", "environment": env, "command": command_line(sys.argv),
              "rows": rows}
    write_json(args.json, result)
    print(f"\nThe report's recipe, one training step (batch 32, Adam); {describe(env)}")
    print(format_table(rows, COLUMNS))
    for row in rows:
        if row.get("operators"):
            print(f"\nOne step of {row['model']} ({row['setting']}), by operator:")
            print(format_table(row["operators"], ("operator", "calls", "self_ms", "share")))
        if row.get("eval"):
            print(f"\nValidation of {row['model']} ({row['setting']}), by batch size:")
            print(format_table(row["eval"], ("eval_batch", "img_s")))
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
    parser.add_argument("--profile", action="store_true",
                        help="profile one step of the last setting, by operator")
    parser.add_argument("--eval-batches", nargs="+", type=int, default=None, metavar="N",
                        help="also time the validation at these batch sizes (last setting)")
    parser.add_argument("--one", nargs=2, metavar=("SPEC", "SETTING"), help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, metavar="PATH")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_script("seed_speed", build_parser(), run, argv)


if __name__ == "__main__":
    main()
