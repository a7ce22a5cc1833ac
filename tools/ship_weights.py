"""Make a run's best.pt into the package's shipped weights, with its record (docs/weights.md).

    python tools/ship_weights.py RUN --name googlenet-w0.25.cifar10 \
        --data-dir ../shared/data/cifar10-jpeg.tar.gz --data-label "CIFAR-10, JPEG copy"

It stores the weights in half precision only when that leaves the test accuracy unchanged:
it measures top-1 on the test set with the float32 and the float16 weights and keeps float32
where they differ by more than ``--tolerance`` (default 0.0005, 0.05 points); then top-1 with
test-time augmentation (6 views) of the weights it keeps. It then writes
``src/cifar_inception/weights/NAME.pt`` (the checkpoint without the optimiser state) and
the manifest entry: the model and options, the recipe and the command (its absolute paths
cut to their last part), epochs, training time, CPU and capability, torch version, data,
test top-1 with and without TTA, mean, std, class names and the file's SHA-256. Run it again
to replace an entry.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from cifar_inception.checkpoint import load_checkpoint, save_checkpoint
from cifar_inception.data import load_cifar10
from cifar_inception.evaluation import evaluate
from cifar_inception.fileio import atomic_write_text
from cifar_inception.pretrained import MANIFEST, sha256_of
from cifar_inception.runs import RunFolder, best_epoch, read_history, read_json_object

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "src" / "cifar_inception" / "weights"
MANIFEST_FORMAT = "cifar-inception-weights/1"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = RunFolder(Path(args.run))
    record = read_json_object(run.config)
    best = load_checkpoint(run.best)
    data = load_cifar10(args.data_dir, download=False)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        candidates = {}
        for precision in ("float32", "float16"):
            candidates[precision] = Path(scratch) / f"{precision}.pt"
            save_checkpoint(candidates[precision],
                            shipped_checkpoint(best, getattr(torch, precision)))
        plain = {precision: test_top1(path, data) for precision, path in candidates.items()}
        print(f"test top-1: {plain}", flush=True)
        half_is_same = abs(plain["float16"] - plain["float32"]) <= args.tolerance
        precision = "float16" if half_is_same else "float32"
        with_tta = test_top1(candidates[precision], data, tta=True)
    dtype = getattr(torch, precision)
    file = f"{args.name}.pt"
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    save_checkpoint(out / file, shipped_checkpoint(
        best, dtype, test_top1=plain[precision], test_top1_tta=with_tta))
    entry = {
        "name": args.name, "model": best["model"]["name"], "options": best["model"]["options"],
        "tag": args.tag, "file": file, "sha256": sha256_of(out / file),
        "default": args.default,
        "record": run_description(record, read_history(run.path), best, args)
        | {"precision": precision,
           "test_acc": plain[precision], "test_acc_tta": with_tta,
           "test_acc_float32": plain["float32"],
           "test_views": 6, "test_images": int(len(data.test_labels))},
    }
    update_manifest(out / MANIFEST, entry)
    print(json.dumps(entry, indent=2))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the run folder whose best.pt ships")
    parser.add_argument("--name", required=True, help="the weights' name, e.g. "
                        "googlenet-w0.25.cifar10")
    parser.add_argument("--tag", default="cifar10", help="what they were trained on")
    parser.add_argument("--default", action="store_true",
                        help="make them the package's default (predict and serve)")
    parser.add_argument("--data-dir", required=True, help="the data the run was trained on")
    parser.add_argument("--data-label", required=True,
                        help='how the record names the data, e.g. "CIFAR-10, JPEG copy"')
    parser.add_argument("--out", default=str(WEIGHTS_DIR),
                        help="the folder of the weights and their manifest (default: the "
                             "package's)")
    parser.add_argument("--tolerance", type=float, default=0.0005)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    return parser.parse_args(argv)


def shipped_checkpoint(best: dict, dtype: torch.dtype, **test: float) -> dict:
    """The checkpoint without its optimiser state, floating-point weights in ``dtype``, its
    metrics those of its epoch and the ``test`` accuracies (which serve and predict show)."""
    state = {key: value.to(dtype) if value.is_floating_point() else value
             for key, value in best["state_dict"].items()}
    metrics = {k: v for k, v in best.get("metrics", {}).items()
               if isinstance(v, (int, float))} | test
    return {key: best[key] for key in ("format", "model", "data")} | {
        "state_dict": state, "metrics": metrics}


def test_top1(path: Path, data, *, tta: bool = False) -> float:
    """Top-1 on the test set, with 6 test-time views when ``tta``."""
    return round(evaluate(path, data, tta=tta, tta_views=6, write=False)["test_top1"], 6)


def run_description(record: dict, history: list[dict], best: dict,
                    args: argparse.Namespace) -> dict:
    """What the manifest says of the run: how it was made and on what."""
    config = record["config"]
    hardware = record["hardware"]
    chosen = best_epoch(history) or {}
    return {
        "recipe": config.get("recipe"),
        "command": shown_command(record["command"]),
        "epochs": len(history), "best_epoch": chosen.get("epoch"),
        "val_acc": chosen.get("val_acc"),
        "train_seconds": round(sum(row["seconds"] for row in history), 1),
        "cpu": hardware.get("cpu"), "cpu_capability": hardware.get("cpu_capability"),
        "threads": hardware.get("threads"), "torch": record["versions"]["torch"],
        "data": args.data_label, "data_checksum": record["data"].get("checksum"),
        "seed": config.get("seed"),
        "classes": best["data"]["classes"], "mean": best["data"]["mean"],
        "std": best["data"]["std"],
        "parameters": record["model"]["parameters"],
        "trained": record.get("started"),
    }


def shown_command(argv: list[str]) -> str:
    """The training command as the manifest shows it: the program as ``cifar-inception``
    and every absolute path (also in ``--option=PATH``) cut to its last part, so that the
    record names no folder of the machine it was trained on."""
    def shown(arg: str) -> str:
        option, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        return option + equals + (Path(value).name if Path(value).is_absolute() else value)
    return shlex.join(["cifar-inception", *map(shown, argv[1:])])


def update_manifest(path: Path, entry: dict) -> None:
    """Add or replace ``entry``; several of these commands may run at once, so the manifest
    is read and rewritten under a lock."""
    with open(path.with_name(".manifest.lock"), "w") as lock:  # ignored by git
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = json.loads(path.read_text()) if path.exists() else {
            "format": MANIFEST_FORMAT, "weights": []}
        others = [w for w in manifest["weights"] if w["name"] != entry["name"]]
        if entry["default"]:
            for other in others:
                other["default"] = False
        manifest["weights"] = sorted([*others, entry], key=lambda w: w["name"])
        atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
