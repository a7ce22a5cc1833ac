"""What a run prints: its first line, a progress bar per epoch, and each epoch's line."""

from __future__ import annotations

from typing import Any

from cifar_inception.distributed import DistContext
from cifar_inception.training.setup import Loop


def start_line(loop: Loop, *, resumed: bool) -> str:
    """``training MODEL (recipe R) on DEVICE: ... images of 32x32, E epochs of S steps ...``"""
    c, p = loop.config, loop.prepared
    processes = f" x{loop.ctx.world_size}" if loop.ctx.enabled else ""
    size = p.info["image_size"]
    return (f"{'resuming' if resumed else 'training'} {c.model} (recipe {c.recipe or 'none'}) "
            f"on {loop.device}{processes}: {p.train_x.shape[0]} training / "
            f"{p.val_x.shape[0]} validation images of {size}x{size}, "
            f"{count(loop.plan.epochs, 'epoch')} of "
            f"{loop.steps_per_epoch} steps ({loop.total_steps} in all), batch {c.batch_size}; "
            f"run folder {loop.run_dir}")


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def progress_bar(total: int, initial: int, epoch: int, epochs: int, ctx: DistContext) -> Any:
    """A tqdm bar where it is drawn, stderr, is a terminal; a silent stand-in elsewhere."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"Epoch {epoch + 1}/{epochs}",
                unit="step", leave=False, disable=None if ctx.is_main else True,
                dynamic_ncols=True)


def format_epoch_line(row: dict, epochs: int) -> str:
    """``Epoch 3/10 - 42.1s - loss: 1.2345 - acc: 0.5678 - val_loss: ... - lr: ...``"""
    parts = [f"Epoch {row['epoch']}/{epochs}", f"{row['seconds']:.1f}s",
             f"loss: {row['train_loss']:.4f}", f"acc: {row['train_acc']:.4f}"]
    if row["val_loss"] is not None:
        parts += [f"val_loss: {row['val_loss']:.4f}", f"val_acc: {row['val_acc']:.4f}"]
    parts.append(f"lr: {row['lr']:.3g}")
    return " - ".join(parts)
