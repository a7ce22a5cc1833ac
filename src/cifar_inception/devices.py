"""Where a run computes: the device, the CPU's threads, and the precision that suits the CPU.

bf16 autocast pays on a CPU only where the CPU has native bf16 dot products (AVX-512 BF16 or
AMX): there it is about 1.4-2x faster than fp32; elsewhere (AVX2 only) PyTorch emulates it and
it is about 10x *slower*. :func:`cpu_precision` decides from the CPU's capability and confirms
with a probe of about a tenth of a second, because the capability can claim what the
libraries will not use (for example oneDNN capped by ``ONEDNN_MAX_CPU_ISA``).
"""

from __future__ import annotations

import ctypes
import os
import platform
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
        chosen = torch.device(device)
    except RuntimeError:
        raise CifarInceptionError(f"unknown device {device!r}") from None
    if chosen.type == "cuda" and chosen.index is not None \
            and chosen.index >= torch.cuda.device_count():
        # torch would fail later, at the first tensor moved there, with its own traceback.
        raise CifarInceptionError(f"device {device!r} asked for, but this machine has "
                                  f"{torch.cuda.device_count()} CUDA device(s)")
    return chosen


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask; a container's CPU set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# glibc's mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def reuse_freed_memory() -> bool:
    """Have the C allocator keep freed memory for the next allocation instead of returning it.

    glibc serves every block over 32 MB (a training step's activations and gradients on the
    CPU) with a fresh ``mmap`` and unmaps it when freed, so the kernel zero-fills every page
    again at its first touch, step after step. Measured on a 2-core AMD EPYC (Zen 3, KVM
    guest): writing a fresh 930 MB block (the gradient of the report's naive network) took
    0.65 to 2.5 s, rewriting a held one 0.07 s (BENCHMARKS.md). PyTorch's CPU tuning guide
    recommends jemalloc or tcmalloc for this; these two glibc settings give a training
    process the same reuse without a preloaded library: no ``mmap`` for large blocks, and no
    trimming of the heap. Returns False where the C library is not glibc (nothing changed).
    """
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, the C library's among them
        is_glibc = hasattr(libc, "gnu_get_libc_version")  # others read these numbers otherwise
    except OSError:
        return False
    return is_glibc and bool(libc.mallopt(_M_MMAP_MAX, 0)) \
        and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, with its family and model numbers where the
    name alone does not tell the generation (a virtual machine's "AMD EPYC"); elsewhere
    what the platform says (platform.processor() is often empty on Linux)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if not key.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


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
