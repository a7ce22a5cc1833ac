"""Where a run computes: the device, the CPU's threads, and the precision that suits the CPU.

bf16 autocast pays on a CPU only where the CPU has native bf16 dot products (AVX-512 BF16 or
AMX): there it is about 1.4-2x faster than fp32; elsewhere (AVX2 only) PyTorch emulates it and
it is about 10x *slower*. :func:`cpu_precision` decides from the CPU's capability and confirms
with a probe of about a tenth of a second, because the capability can claim what the
libraries will not use (for example oneDNN capped by ``ONEDNN_MAX_CPU_ISA``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cifar_inception.errors import CifarInceptionError

BF16_SPEEDUP_NEEDED = 1.15  # below this, fp32's exactness is worth more than the time


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CifarInceptionError(f"device {device!r} asked for, but CUDA is not available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise CifarInceptionError(f"unknown device {device!r}") from None


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask; a container's CPU set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def cpu_capability() -> str:
    """PyTorch's name for the CPU's vector instructions: AVX2, AVX512, DEFAULT, ..."""
    return str(torch.backends.cpu.get_cpu_capability())


def has_native_bf16() -> bool:
    """Does the CPU have bf16 dot-product instructions (AVX-512 BF16 or AMX-BF16)?"""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own tests
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


@dataclass(frozen=True)
class Precision:
    bf16: bool
    reason: str

    def describe(self) -> str:
        return f"{'bf16' if self.bf16 else 'fp32'}: {self.reason}"


def cpu_precision(requested: bool | None, *, capability: str | None = None,
                  native_bf16: bool | None = None,
                  probe: callable | None = None) -> Precision:
    """bf16 autocast on this CPU or not, and why.

    ``requested`` (``--cpu-amp``/``--no-cpu-amp``) wins; otherwise bf16 only where the
    capability is AVX-512 or better, the CPU has native bf16, and a short probe finds it
    at least :data:`BF16_SPEEDUP_NEEDED` times faster than fp32. The keyword arguments stand
    in for the machine in tests.
    """
    if requested is not None:
        return Precision(requested, f"asked for with --{'' if requested else 'no-'}cpu-amp")
    capability = cpu_capability() if capability is None else capability
    if not capability.upper().startswith("AVX512"):
        return Precision(False, f"this CPU has no native bf16 (torch capability {capability})")
    native = has_native_bf16() if native_bf16 is None else native_bf16
    if not native:
        return Precision(False, f"this CPU has no native bf16 (capability {capability}, "
                                "no AVX-512 BF16 or AMX)")
    speedup = (probe or bf16_speedup)()
    if speedup < BF16_SPEEDUP_NEEDED:
        return Precision(False, f"bf16 was only {speedup:.2f}x as fast as fp32 in a probe "
                                f"(capability {capability})")
    return Precision(True, f"this CPU computes bf16 natively ({capability}), {speedup:.1f}x "
                           "as fast as fp32 in a probe")


def bf16_speedup(repeats: int = 3) -> float:
    """fp32 time / bf16-autocast time of a small convolution's forward and backward."""
    torch.manual_seed(0)
    x = torch.randn(8, 64, 16, 16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, requires_grad=True)

    def seconds(bf16: bool) -> float:
        best = float("inf")
        for _ in range(repeats + 1):  # the first creates the kernels: not counted
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                F.conv2d(x, w, padding=1).float().sum().backward()
            best = min(best, time.perf_counter() - started)
        return best

    rng = torch.get_rng_state()
    try:
        return seconds(False) / max(seconds(True), 1e-9)
    finally:
        torch.set_rng_state(rng)
