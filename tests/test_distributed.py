"""Data-parallel training under torchrun with gloo on the CPU: same result as one process.

The runs use the tiny test model, which has no batch norm and no dropout: with batch norm,
each rank would normalise with its own half-batch statistics (SyncBatchNorm runs on CUDA
only), so the two set-ups would compute different things, not just round differently.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifar_inception import distributed
from cifar_inception.checkpoint import load_checkpoint
from cifar_inception.cli import main
from cifar_inception.distributed import DistContext, DistributedError

TESTS = Path(__file__).resolve().parent
from synthetic_data import TINY, easy_data, write_image_tree

# Two processes average two half-batch gradients where one process takes the mean over the
# whole batch: the same sum in another order, so the weights agree up to float32 rounding,
# which momentum carries from step to step. Measured here: a largest absolute difference of
# 7.3e-6 after 3 epochs (15 steps); a rank training on the wrong images would differ by
# orders of magnitude more than this bound.
WEIGHT_TOLERANCE = 1e-4

SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import synthetic_data  # registers the tiny test model
from cifar_inception.errors import CifarInceptionError

if os.environ.get("TEST_FAIL_RANK") == os.environ.get("RANK"):
    import cifar_inception.training.optim as train
    real, calls = train.training_loss, []

    def failing(*args, **kwargs):  # this rank fails at its third step
        calls.append(1)
        if len(calls) == 3:
            raise CifarInceptionError("injected failure")
        return real(*args, **kwargs)

    train.training_loss = failing

from cifar_inception.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(tmp_path: Path, args: list[str], *, nproc: int = 2, timeout: float = 180,
             env: dict | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "entry.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               str(script), *args]
    full_env = dict(os.environ, CIFAR_INCEPTION_CACHE=str(tmp_path / "cache"),
                    OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(command, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_INCEPTION_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "tree"
    write_image_tree(easy_data(n_train=200, n_test=20), root)
    return root


def common_args(tree: Path, tmp_path: Path) -> list[str]:
    return ["train", TINY, "--data-dir", str(tree), "--epochs", "3", "--batch-size", "32",
            "--lr", "0.1", "--val-size", "40", "--warmup-epochs", "0.5", "--output",
            str(tmp_path / "runs"), "--threads", "1", "--no-test",
            "--no-cpu-amp"]  # fp32: bf16 rounding of two half-batches differs more


# --------------------------------------------------------------------------- helpers


def test_context_from_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.context_from_environment() == DistContext(0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = distributed.context_from_environment()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (3, 4, 1, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(DistributedError, match="inconsistent"):
        distributed.context_from_environment()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(DistributedError, match="not an integer"):
        distributed.context_from_environment()


def test_global_batch_is_split_evenly():
    ctx = DistContext(rank=1, world_size=4)
    assert distributed.per_rank_batch(32, ctx) == 8
    batch = torch.arange(32)
    assert torch.equal(distributed.shard(batch, ctx), torch.arange(8, 16))
    with pytest.raises(DistributedError, match="not divisible by the 4 processes"):
        distributed.per_rank_batch(30, ctx)
    assert distributed.shard(batch, DistContext()) is batch


def _answer_any_rank(rank: int, store: str, answers: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=2)
    try:
        said = distributed.any_rank(rank == 1, DistContext(rank, 2), torch.device("cpu"))
        Path(answers, str(rank)).write_text(str(said))
    finally:
        torch.distributed.destroy_process_group()


def test_a_flag_raised_on_one_rank_is_seen_by_every_rank(tmp_path):
    """How the ranks agree to stop at an epoch's end when Ctrl-C reached only one so far."""
    assert distributed.any_rank(True, DistContext(), torch.device("cpu")) is True
    assert distributed.any_rank(False, DistContext(), torch.device("cpu")) is False
    torch.multiprocessing.spawn(_answer_any_rank, args=(str(tmp_path / "store"), str(tmp_path)),
                                nprocs=2)
    assert [(tmp_path / r).read_text() for r in ("0", "1")] == ["True", "True"]


def test_sync_bn_needs_cuda():
    with pytest.raises(DistributedError, match="needs CUDA"):
        distributed.convert_sync_batchnorm(torch.nn.BatchNorm2d(3), DistContext(0, 2),
                                           torch.device("cpu"))


# --------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_two_processes_match_one_and_resume(tree, tmp_path):
    """2 gloo processes (paused after 2 epochs, then resumed) end where 1 process ends."""
    args = common_args(tree, tmp_path)
    assert main([*args, "--name", "single"]) == 0

    first = torchrun(tmp_path, [*args, "--name", "ddp", "--stop-after-epochs", "2"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("Epoch 1/3 - ") == 1  # only rank 0 prints
    assert "paused after epoch 2 of 3" in first.stdout
    run = tmp_path / "runs" / "ddp"
    second = torchrun(tmp_path, ["train", "--resume", str(run)])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Epoch 3/3 - " in second.stdout

    single = load_checkpoint(tmp_path / "runs" / "single" / "last.pt")
    ddp = load_checkpoint(run / "last.pt")
    assert ddp["training"]["world_size"] == 2
    differences = [float((single["state_dict"][k] - ddp["state_dict"][k]).abs().max())
                   for k in single["state_dict"]]
    assert max(differences) < WEIGHT_TOLERANCE, differences
    record = json.loads((run / "config.json").read_text())
    assert record["hardware"]["world_size"] == 2 and len(record["resumed"]) == 1
    single_rows = (tmp_path / "runs" / "single" / "metrics.jsonl").read_text().splitlines()
    ddp_rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(ddp_rows) == len(single_rows) == 3
    for a, b in zip(map(json.loads, single_rows), map(json.loads, ddp_rows)):
        assert b["val_acc"] == pytest.approx(a["val_acc"], abs=1 / 40)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


@pytest.mark.slow
def test_a_failing_rank_stops_the_job(tree, tmp_path):
    started = time.monotonic()
    result = torchrun(tmp_path, [*common_args(tree, tmp_path), "--name", "fail",
                                 "--dist-timeout", "30"], env={"TEST_FAIL_RANK": "1"},
                      timeout=150)
    assert result.returncode != 0
    assert "cifar-inception: error: rank 1: injected failure" in result.stderr
    assert time.monotonic() - started < 120  # stopped, not hung until a long timeout


def test_batch_not_divisible_by_processes_is_refused(tree, tmp_path, monkeypatch, capsys):
    """Checked before any process group is needed: one rank of a pretend 3-process job."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "init", lambda *a, **k: None)
    monkeypatch.setattr(distributed, "main_first", _no_wait)
    code = main([*common_args(tree, tmp_path), "--name", "odd"])
    assert code == 2
    assert "batch size 32 is not divisible by the 3 processes" in capsys.readouterr().err


class _no_wait:
    def __init__(self, *_):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False
