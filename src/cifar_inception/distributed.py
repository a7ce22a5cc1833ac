"""Data-parallel training under ``torchrun``: who am I, talking to the others, sharding.

``torchrun --nproc_per_node=N -m cifar_inception train ...`` starts N copies of the command
with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set (and across nodes with torchrun's usual
rendezvous options). Each process then trains a replica under DistributedDataParallel:
NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on the CPU.

Every collective has a timeout (``--dist-timeout``), so a rank that dies or hangs makes the
others fail with an error instead of waiting forever; torchrun then stops the whole job.
Without these variables everything here is a no-op and training runs as one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from cifar_inception.errors import CifarInceptionError


class DistributedError(CifarInceptionError):
    """A distributed launch that cannot work: bad environment, batch not divisible, ..."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def context_from_environment() -> DistContext:
    """The rank, world size and local rank torchrun set (one process when absent)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"inconsistent torchrun environment: RANK={rank}, "
                               f"WORLD_SIZE={world_size}")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def device_for(ctx: DistContext, device: torch.device) -> torch.device:
    """One GPU per process: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if device.type == "cuda" and ctx.enabled and device.index is None:
        if ctx.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {ctx.local_rank} has no GPU: only {torch.cuda.device_count()} "
                f"visible; start at most that many processes per node")
        device = torch.device("cuda", ctx.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init(ctx: DistContext, device: torch.device, timeout_s: float) -> None:
    """Join the process group (no-op for one process)."""
    if not ctx.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    options = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **options)


_COMMUNICATION_SIGNS = ("gloo", "nccl", "connection closed", "connection reset",
                       "timed out", "timeout", "broken pipe")


def is_communication_failure(exc: BaseException) -> bool:
    """A collective that failed because another rank died, hung or became unreachable."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(
        sign in str(exc).lower() for sign in _COMMUNICATION_SIGNS)


def communication_error(ctx: DistContext, exc: BaseException) -> DistributedError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return DistributedError(
        f"rank {ctx.rank}: lost contact with the other processes ({first}); another rank "
        f"probably failed first: look for its message")


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (on one process, the flag itself): for decisions
    that every rank must take alike, such as stopping."""
    if not ctx.enabled:
        return flag
    return bool(all_reduce(torch.tensor([float(flag)], device=device), ctx, op="max").item())


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


@contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Let rank 0 go first (e.g. to fill a cache), then the others, so they never race."""
    if not ctx.is_main:
        barrier(ctx)
    yield
    if ctx.is_main:
        barrier(ctx)


def all_reduce(tensor: torch.Tensor, ctx: DistContext, op: str = "sum") -> torch.Tensor:
    """Sum (or max) a tensor over the ranks, in place; unchanged for one process."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def broadcast_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics) before evaluating."""
    if ctx.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def per_rank_batch(global_batch: int, ctx: DistContext) -> int:
    """The global batch is split evenly: each rank takes global_batch / world_size images."""
    if global_batch % ctx.world_size:
        raise DistributedError(
            f"batch size {global_batch} is not divisible by the {ctx.world_size} processes; "
            f"the batch size is global, so choose a multiple of {ctx.world_size}")
    return global_batch // ctx.world_size


def shard(batch: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's contiguous share of a global batch."""
    if not ctx.enabled:
        return batch
    size = batch.shape[0] // ctx.world_size
    return batch[ctx.rank * size:(ctx.rank + 1) * size]


def wrap(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """Wrap for DistributedDataParallel (identity for one process)."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def convert_sync_batchnorm(model: nn.Module, ctx: DistContext, device: torch.device
                           ) -> nn.Module:
    """Batch-norm statistics over the global batch instead of each rank's share."""
    if not ctx.enabled:
        return model
    if device.type != "cuda":
        raise DistributedError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm does not run "
                               "on the CPU; leave it off with gloo")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
