"""Where one training epoch spends its time: data, forward, backward, optimiser, validation.

    python benchmarks/profile_epoch.py --recipe cpu10 --data-dir ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/profile_epoch.py --recipe cpu10 --data-dir DATA --set amp=false  # compare

Runs one epoch of the recipe through ``cifar_inception.training`` under ``torch.profiler``. The
training loop labels its phases (``record_function``): ``data`` (gather the batch, augment,
normalise), ``forward`` (model and loss), ``backward``, ``optimizer`` (step, learning rate,
weight averaging) and ``validation``; whatever else the epoch does (checkpoints, logging)
is ``other``. Prints the split and the operators that cost most, and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from torch.profiler import ProfilerActivity, profile

from _common import (
    command_line,
    describe,
    environment,
    format_table,
    parse_settings,
    pick_device,
    write_json,
)

PHASES = ("data", "forward", "backward", "optimizer", "validation")


def phase_split(prof: Any, wall_seconds: float) -> list[dict[str, Any]]:
    """Seconds per labelled phase (their events' total CPU time), and the rest as ``other``."""
    totals = {event.key: event.cpu_time_total / 1e6 for event in prof.key_averages()
              if event.key in PHASES}
    rows = [{"phase": phase, "seconds": round(totals.get(phase, 0.0), 3)} for phase in PHASES]
    rows.append({"phase": "other", "seconds": round(max(0.0, wall_seconds - sum(totals.values())),
                                                    3)})
    for row in rows:
        row["share"] = f"{100 * row['seconds'] / wall_seconds:.1f}%" if wall_seconds else "-"
    return rows


def top_operators(prof: Any, count: int) -> list[dict[str, Any]]:
    events = [e for e in prof.key_averages() if e.key not in PHASES
              and not e.key.startswith(("ProfilerStep", "autograd::engine"))]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"operator": e.key, "calls": e.count,
             "self_seconds": round(e.self_cpu_time_total / 1e6, 3),
             "share": f"{100 * e.self_cpu_time_total / total:.1f}%"} for e in events[:count]]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="cpu10")
    parser.add_argument("--model", default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training option (repeatable)")
    parser.add_argument("--top", type=int, default=15, help="operators to list")
    parser.add_argument("--out-dir", default="/tmp/cifar-inception-benchmarks")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)

    from cifar_inception.data import load_cifar10
    from cifar_inception.recipes import build_config
    from cifar_inception.training import train

    device = pick_device(args.device)
    settings = {"epochs": 1, "test": False, **parse_settings(args.set)}
    config = build_config(args.model, args.recipe, cuda=device.type == "cuda",
                          device=str(device), data_dir=args.data_dir, out_dir=args.out_dir,
                          **settings)
    data = load_cifar10(args.data_dir, download=args.download)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        result = train(config, data, log=lambda line: print(line, flush=True))
        wall = time.perf_counter() - started
    epoch_seconds = result.history[-1]["seconds"] if result.history else wall
    env = environment(device)
    env["threads"] = config.num_threads or env["threads"]  # what the training ran with
    phases = phase_split(prof, epoch_seconds)
    operators = top_operators(prof, args.top)
    output = {"benchmark": "profile_epoch", "environment": env, "recipe": args.recipe,
              "settings": settings, "command": command_line(sys.argv),
              "epoch_seconds": epoch_seconds,
              "wall_seconds": round(wall, 2), "phases": phases, "operators": operators}
    write_json(args.json, output)
    print(f"\nOne epoch of recipe {args.recipe}"
          f"{' with ' + ' '.join(args.set) if args.set else ''}: {epoch_seconds:.1f}s "
          f"(under the profiler); {describe(env)}")
    print(format_table(phases, ("phase", "seconds", "share")))
    print(f"\nTop {args.top} operators by self CPU time")
    print(format_table(operators, ("operator", "calls", "self_seconds", "share")))
    return output


if __name__ == "__main__":
    main()
