"""What every benchmark script shares: the machine's description, tables, JSON output, timers.

The scripts in this folder are run as ``python benchmarks/NAME.py``; Python then puts this
folder on ``sys.path``, which is how they import this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cifar_inception import __version__
from cifar_inception.devices import cpu_capability, cpu_name, has_native_bf16, usable_cores
from cifar_inception.errors import CifarInceptionError
from cifar_inception.fileio import atomic_write_json
from cifar_inception.models.registry import option_value
from cifar_inception.recipes import TrainConfig


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU; ``cuda`` without CUDA falls back, saying so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        print(f"note: {name} asked for but CUDA is not available; using the CPU")
        return torch.device("cpu")
    return torch.device(name)


def environment(device: torch.device) -> dict[str, Any]:
    """Hardware, versions, threads and date: the header of every result file."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cifar_inception": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_capability": cpu_capability(),
        "cpu_native_bf16": has_native_bf16(),
        "cpu_count": usable_cores(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    capped = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
              if k in os.environ}
    if capped:  # an older CPU emulated by capping the kernels' instruction sets
        info["emulated_isa"] = capped
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def describe(env: dict[str, Any]) -> str:
    capability = env.get("cpu_capability", "?")
    if env.get("emulated_isa"):
        capability += " (emulated: " + ", ".join(f"{k}={v}" for k, v in
                                                 env["emulated_isa"].items()) + ")"
    hardware = env.get("gpu") or f"{env['cpu']} ({env['cpu_count']} cores, " \
                                  f"{env['threads']} threads, torch capability {capability})"
    load = f", load {env['load_average_1min']}" if "load_average_1min" in env else ""
    return f"{hardware}; torch {env['torch']}; {env['date']}{load}"


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for none."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` in ``columns`` (floats to 4 significant digits)."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def command_line(argv: Sequence[str]) -> list[str]:
    """The command as a results file records it: absolute paths that exist are written
    relative to the folder it ran in, so that a file made on one machine names no folder
    of that machine's."""
    return [os.path.relpath(arg) if os.path.isabs(arg) and os.path.exists(arg) else arg
            for arg in argv]


def write_json(path: str | os.PathLike | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, result)
        print(f"wrote {path}")


class Timer:
    """Wall-clock seconds of a piece of work; on CUDA, CUDA events around it (after a sync)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, work: Callable[[], Any]) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        started = time.perf_counter()
        work()
        return time.perf_counter() - started


def run_script(name: str, parser: argparse.ArgumentParser, run: Callable[[Any], Any],
               argv: list[str] | None = None) -> Any:
    """Parse, check ``--seeds`` where there is one, run; a user error is one line, exit 1."""
    args = parser.parse_args(argv)
    if getattr(args, "seeds", 1) < 1:
        raise SystemExit("--seeds must be >= 1")
    try:
        return run(args)
    except CifarInceptionError as exc:
        raise SystemExit(f"{name}: error: {exc}") from None


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``["epochs=3", "lookahead=false"]`` -> typed training options (by TrainConfig's types)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    defaults = TrainConfig()
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise SystemExit(f"--set {pair!r}: not KEY=VALUE with a training option as KEY")
        settings[key] = _typed(text.strip(), getattr(defaults, key))
    return settings


def _typed(text: str, default: Any) -> Any:
    if text.lower() in ("none", "null"):
        return None
    if text.startswith(("{", "[")):
        try:
            return json.loads(text)
        except ValueError:
            raise SystemExit(f"not valid JSON: {text!r}") from None
    if isinstance(default, bool) or text.lower() in ("true", "false"):
        if text.lower() not in ("true", "false"):
            raise SystemExit(f"expected true or false, not {text!r}")
    return option_value(text)
