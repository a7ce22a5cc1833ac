"""Several processes of one machine as the ranks of one training job, without torchrun.

On a CPU, N processes of one thread each train more images per second than one process of
N threads: every small operator of a multi-threaded process ends at a barrier where its
threads wait for each other, while N processes meet once a step, for the all-reduce of the
gradients. How much that buys depends on the batch and the CPU (BENCHMARKS.md, "Threads
or processes"), so it is asked for:
``--processes N`` makes :func:`cifar_inception.train` on a CPU run :func:`run_ranks`,
which gives each process the environment torchrun would give it on one machine (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ...) and waits for them:

- the ranks run in a session of their own, and this process passes each Ctrl-C (SIGINT) or
  SIGTERM it gets on to them once: they finish their step, save and stop together (a second
  Ctrl-C stops them at once); were this process killed outright, each rank sends itself a
  SIGTERM once it sees its parent gone (:func:`stop_with_parent`), so no rank trains on
  unattended;
- when a rank fails, the others are stopped (killed if they do not stop within
  STOP_GRACE_S: they may be blocked in a collective that will never complete) and
  :class:`RankFailed` names it.

In a process that is already a rank (torchrun's or ours), nothing is launched again.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from cifar_inception.errors import TrainingError

PARENT_ENV = "CIFAR_INCEPTION_LAUNCHER_PID"  # the rank watches it (stop_with_parent)
STOP_GRACE_S = 10.0  # how long the other ranks get to stop after one has failed


def under_launcher() -> bool:
    """Is this process already one rank of a job (torchrun's or ours)?"""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RankFailed(TrainingError):
    """A rank ended with an error; the others were stopped."""

    def __init__(self, rank: int, status: int, processes: int):
        super().__init__(f"training process {rank} of {processes} ended with exit status "
                         f"{status}")
        self.rank, self.status = rank, status


def run_ranks(module: str, args: list[str], processes: int) -> list[int]:
    """Run ``python -m module *args`` as ``processes`` ranks of one job on this machine and
    wait for them: their exit statuses, or :class:`RankFailed` for the first rank that failed
    (the others are stopped)."""
    ranks = _start_ranks(module, args, processes)
    failed = _wait(ranks)
    if failed is not None:
        raise RankFailed(*failed, processes)
    return [rank.returncode for rank in ranks]


def _start_ranks(module: str, args: list[str], processes: int) -> list[subprocess.Popen]:
    port = free_port()
    ranks = []
    for rank in range(processes):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               PARENT_ENV: str(os.getpid())}
        ranks.append(subprocess.Popen([sys.executable, "-m", module, *args], env=env,
                                      start_new_session=True))
    return ranks


def stop_with_parent(parent_pid: int, every_s: float = 1.0) -> None:
    """In a rank: SIGTERM to itself once the launching process is gone, so that no rank
    trains on unattended were the parent killed outright. A watching thread rather than
    prctl(PR_SET_PDEATHSIG) in a preexec_fn: code run between fork and exec in a process
    with threads (torch's) can deadlock or abort the child."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(every_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()


def _wait(ranks: list[subprocess.Popen]) -> tuple[int, int] | None:
    """Wait for every rank; the first that failed (rank, exit status), the others stopped."""
    def forward(signum: int, _frame: object) -> None:
        for rank in ranks:
            if rank.poll() is None:
                rank.send_signal(signum)

    handled = (signal.SIGINT, signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in handled} if in_main_thread else {}
    try:
        while True:
            statuses = [r.poll() for r in ranks]
            failed = next(((i, s) for i, s in enumerate(statuses)
                           if s not in (None, 0, 130)), None)
            if failed is not None:
                _stop(ranks)
                return failed
            if all(s is not None for s in statuses):
                return None
            time.sleep(0.2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop(ranks: list[subprocess.Popen]) -> None:
    """Ask the ranks still running to stop; kill those that cannot (blocked in a collective)."""
    for rank in ranks:
        if rank.poll() is None:
            rank.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for rank in ranks:
        try:
            rank.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rank.kill()
            rank.wait()
