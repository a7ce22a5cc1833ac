"""The main job under load: does ``cifar-inception train`` keep its time budget?

    python benchmarks/budget_under_load.py --data-dir ../shared/data/cifar10-jpeg.tar.gz \\
        --budget 10m --json /tmp/budget-under-load.json --markdown BENCHMARKS.md

Runs the whole command (``python -m cifar_inception train --budget B``, the default
recipe; ``--train-args`` adds options) in a fresh process under each condition:

- ``idle``: nothing else of this benchmark's runs;
- ``hog-whole``: a CPU hog on one core for the whole run;
- ``hog-half``: a hog from half the budget on;
- ``hog-first``: a hog for the first ``--hog-first-s`` seconds only (default 60).

A hog is a process of this benchmark, started in its own session (``setsid``), as another
program would be (the kernel shares the CPU between sessions first), pinned to the first
core this process may use. It spins for at most the budget and a half, and the benchmark
ends it (its whole session) when the condition is over.

For each condition it reports the command's wall time against the budget, the CPU seconds
the run got (user and system, from the kernel's account of the child), the epochs and the
test top-1 of best.pt, and prints (``--markdown``: appends) a table that names the machine.
The done-when of a budget: every condition within the budget +5%, and not before 90% of it.

Then (``--equal-cpu``, the default) each loaded condition is set beside an idle run given
the same CPU time: a budget of the loaded run's CPU seconds over the cores this process may
use. Under load the accuracy should be no more than a point below that run's: what the load
took should cost only the CPU it took.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from _common import describe, environment, format_table, run_script, write_json
from cifar_inception.options import parse_duration

CONDITIONS = ("idle", "hog-whole", "hog-half", "hog-first")
COLUMNS = ("condition", "budget_s", "wall_s", "wall_share", "cpu_s", "epochs", "test_top1",
           "vs_equal_cpu")

# What a hog runs: spin on one core until its deadline (it ends itself if never ended).
HOG = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    pass
"""


class Hog:
    """A CPU hog on one core, in its own session, from ``start_s`` for ``seconds``."""

    def __init__(self, core: int, start_s: float, seconds: float):
        self.core, self.seconds = core, seconds
        self.process: subprocess.Popen | None = None
        self.timer = threading.Timer(start_s, self._start)

    def __enter__(self) -> Hog:
        self.timer.start()
        return self

    def _start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", HOG, str(self.core),
                                         str(self.seconds)], start_new_session=True)

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()
        self.timer.join()
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: nothing else
        if self.process is not None:
            self.process.wait()


def hog_for(condition: str, budget_s: float, first_s: float) -> tuple[float, float] | None:
    """(start, seconds) of the condition's hog; None for none."""
    most = budget_s * 1.5  # bounded: a hog that outlives its run ends itself
    return {"idle": None, "hog-whole": (0.0, most), "hog-half": (budget_s / 2, most),
            "hog-first": (0.0, min(first_s, most))}[condition]


def run_command(argv: list[str], log: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and exit status of a child command, whose
    output goes to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime, process.returncode


def outcome(run_dir: Path) -> tuple[int, float | None]:
    """Epochs trained and test top-1, from the run folder's records."""
    metrics = run_dir / "metrics.jsonl"
    epochs = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    evaluation = run_dir / "eval.json"
    top1 = json.loads(evaluation.read_text()).get("test_top1") if evaluation.exists() else None
    return epochs, top1


def run_condition(condition: str, args: argparse.Namespace, budget_s: float,
                  label: str | None = None) -> dict[str, Any]:
    name = f"{condition}-{time.strftime('%Y%m%d-%H%M%S')}"
    argv = [sys.executable, "-m", "cifar_inception", "train", "--data-dir", args.data_dir,
            "--budget", f"{budget_s:g}", "--output", args.out_dir, "--name", name,
            *shlex.split(args.train_args)]
    hog = hog_for(condition, budget_s, args.hog_first_s)
    core = min(os.sched_getaffinity(0))
    with Hog(core, *hog) if hog else _nothing():
        wall_s, cpu_s, code = run_command(argv, Path(args.out_dir) / f"{name}.log")
    epochs, top1 = outcome(Path(args.out_dir) / name)
    row = {"condition": label or condition, "budget_s": budget_s, "wall_s": wall_s,
           "wall_share": wall_s / budget_s, "cpu_s": cpu_s, "epochs": epochs,
           "test_top1": top1, "exit": code, "run": name}
    print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    return row


def equal_cpu_references(rows: list[dict[str, Any]], args: argparse.Namespace
                         ) -> list[dict[str, Any]]:
    """For each loaded row: an idle run given the CPU time it got (budget = its CPU seconds
    over the cores), and the loaded row's accuracy against it (``vs_equal_cpu``, points)."""
    cores = len(os.sched_getaffinity(0))
    references = []
    for row in [r for r in rows if r["condition"] != "idle"]:
        budget_s = round(row["cpu_s"] / cores)
        reference = run_condition("idle", args, budget_s,
                                  label=f"idle, {row['condition']}'s CPU time")
        if row["test_top1"] is not None and reference["test_top1"] is not None:
            row["vs_equal_cpu"] = 100 * (row["test_top1"] - reference["test_top1"])
        references.append(reference)
    return references


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    budget_s = parse_duration(args.budget)
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    unknown = sorted(set(conditions) - set(CONDITIONS))
    if unknown:
        raise SystemExit(f"budget_under_load: unknown condition(s) {', '.join(unknown)}; "
                         f"known: {', '.join(CONDITIONS)}")
    env = environment(torch.device("cpu"))
    print(f"# {describe(env)}")
    rows = [run_condition(condition, args, budget_s) for condition in conditions]
    if args.equal_cpu:
        rows += equal_cpu_references(rows, args)
    table = format_table(rows, COLUMNS)
    section = (f"\n### The budget under load ({args.budget})\n\n{describe(env)}; "
               f"`train --budget {args.budget} {args.train_args}`\n\n{table}\n")
    print(section)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as markdown:
            markdown.write(section)
        print(f"appended to {args.markdown}")
    result = {"environment": env, "budget_s": budget_s, "train_args": args.train_args,
              "rows": rows, "table": table}
    write_json(args.json, result)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="CIFAR-10 (archive or image tree)")
    parser.add_argument("--budget", default="10m", help="each run's --budget (default 10m)")
    parser.add_argument("--conditions", default=",".join(CONDITIONS),
                        help=f"comma-separated, of {', '.join(CONDITIONS)} (default all)")
    parser.add_argument("--hog-first-s", type=float, default=60.0,
                        help="seconds of the hog-first condition's hog (default 60)")
    parser.add_argument("--train-args", default="",
                        help="more options of the train command, as one string")
    parser.add_argument("--equal-cpu", action=argparse.BooleanOptionalAction, default=True,
                        help="set each loaded run beside an idle run of the same CPU time")
    parser.add_argument("--out-dir", default="runs/budget-under-load")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--markdown", default=None,
                        help="append the table to this file (for example BENCHMARKS.md)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_script("budget_under_load", build_parser(), run, argv)


if __name__ == "__main__":
    main()
