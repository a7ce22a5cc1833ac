"""OpenMP's wait policy and thread pinning, on an idle machine and beside a CPU hog: which
setting trains fastest?

    python benchmarks/omp_policy.py --json /tmp/omp-policy.json --markdown BENCHMARKS.md

Each setting runs ``benchmarks/throughput.py`` (training images/s; by default inception-cpu
as the ``cpu10`` recipe builds it, batch 256, fp32, channels-last) in a fresh process, since
OpenMP reads its environment once, when it starts. Each runs idle and beside a hog on one
core (``budget_under_load.Hog``: its own session, bounded, ended by this script). Settings:
all the cores' threads as they come (the default), with ``OMP_WAIT_POLICY=PASSIVE`` (a
waiting thread sleeps at once) and ``ACTIVE`` (it spins), pinned (``OMP_PROC_BIND=close``,
``OMP_PLACES=cores``), and one thread, as they come and pinned.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from _common import describe, environment, format_table, run_script, write_json
from budget_under_load import Hog

HERE = Path(__file__).resolve().parent
PINNED = {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}
COLUMNS = ("setting", "idle_img_s", "hog_img_s")


def settings(cores: int) -> dict[str, tuple[dict[str, str], int]]:
    """Name -> (environment added, threads)."""
    return {
        f"{cores} threads (default)": ({}, cores),
        f"{cores} threads, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, cores),
        f"{cores} threads, OMP_WAIT_POLICY=ACTIVE": ({"OMP_WAIT_POLICY": "ACTIVE"}, cores),
        f"{cores} threads, pinned": (PINNED, cores),
        "1 thread": ({}, 1),
        "1 thread, pinned": (PINNED, 1),
    }


def training_rate(args: argparse.Namespace, extra_env: dict[str, str], threads: int) -> float:
    """Training images/s of one fresh ``throughput.py`` process with this environment."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "rate.json"
        argv = [sys.executable, str(HERE / "throughput.py"), "--models", args.model,
                "--batch-size", str(args.batch_size), "--no-amp", "--channels-last",
                "--modes", "train", "--steps", str(args.steps), "--warmup", "2",
                "--threads", str(threads), "--json", str(out)]
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("OMP_", "GOMP_", "KMP_"))}
        subprocess.run(argv, env={**env, **extra_env}, check=True,
                       stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["rows"][0]["train_img_s"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0))
    env = environment(torch.device("cpu"))
    print(f"# {describe(env)}", flush=True)
    rows = []
    for name, (extra_env, threads) in settings(cores).items():
        row = {"setting": name, "idle_img_s": training_rate(args, extra_env, threads)}
        with Hog(min(os.sched_getaffinity(0)), 0.0, args.hog_s):
            row["hog_img_s"] = training_rate(args, extra_env, threads)
        rows.append(row)
        print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    table = format_table(rows, COLUMNS)
    section = (f"\n### OpenMP wait policy and pinning, idle and beside a hog on one core\n\n"
               f"{describe(env)}; `benchmarks/omp_policy.py --model {args.model} "
               f"--batch-size {args.batch_size} --steps {args.steps}` (training images/s, "
               f"fp32, channels-last, one run each)\n\n{table}\n")
    print(section)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as markdown:
            markdown.write(section)
        print(f"appended to {args.markdown}")
    result = {"environment": env, "rows": rows, "table": table}
    write_json(args.json, result)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="inception-cpu:reduce=true,fuse=true")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--hog-s", type=float, default=300.0,
                        help="most seconds a hog spins (it is ended when its setting is)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--markdown", default=None,
                        help="append the table to this file (for example BENCHMARKS.md)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_script("omp_policy", build_parser(), run, argv)


if __name__ == "__main__":
    main()
