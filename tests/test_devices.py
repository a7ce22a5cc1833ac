"""Where a run computes: precision from the CPU's capability, threads, the device."""

from __future__ import annotations

import pytest
import torch

from cifar_inception.devices import cpu_precision, pick_device, usable_cores
from cifar_inception.errors import CifarInceptionError


def never_probed():
    raise AssertionError("no probe is needed to decide this")


@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT", "ZVECTOR"])
def test_no_bf16_without_avx512(capability):
    precision = cpu_precision(None, capability=capability, probe=never_probed)
    assert not precision.bf16
    assert precision.describe() == f"fp32: this CPU has no native bf16 (torch capability " \
                                   f"{capability})"


def test_avx512_without_bf16_instructions_stays_fp32():
    precision = cpu_precision(None, capability="AVX512", native_bf16=False, probe=never_probed)
    assert not precision.bf16 and "no AVX-512 BF16 or AMX" in precision.reason


def test_native_bf16_is_used_when_the_probe_finds_it_faster():
    precision = cpu_precision(None, capability="AVX512", native_bf16=True, probe=lambda: 1.6)
    assert precision.bf16 and precision.describe().startswith("bf16: this CPU computes bf16")


def test_native_bf16_that_is_not_faster_is_not_used():
    precision = cpu_precision(None, capability="AVX512", native_bf16=True, probe=lambda: 1.05)
    assert not precision.bf16 and "1.05x" in precision.reason


@pytest.mark.parametrize("requested", [True, False])
def test_the_flag_wins(requested):
    precision = cpu_precision(requested, capability="AVX2", probe=never_probed)
    assert precision.bf16 is requested and "cpu-amp" in precision.reason


def test_threads_default_to_the_usable_cores():
    assert 1 <= usable_cores() <= (torch.get_num_threads() + 1024)


def test_unknown_or_missing_devices_are_one_line_errors():
    with pytest.raises(CifarInceptionError, match="unknown device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(CifarInceptionError, match="CUDA is not available"):
            pick_device("cuda")
    assert pick_device("cpu").type == "cpu"


@pytest.mark.skipif(not hasattr(__import__("ctypes").CDLL(None), "gnu_get_libc_version"),
                    reason="the allocator settings are glibc's")
def test_freed_memory_is_kept_for_reuse_under_glibc():
    from cifar_inception.devices import reuse_freed_memory

    assert reuse_freed_memory() is True
    big = torch.ones(16 << 20)  # 64 MB: over glibc's mmap threshold, now from the heap
    assert float(big.sum()) == 16 << 20


@pytest.mark.parametrize("asked, used, said", [
    (4096, 2, "2 threads per process (--threads 4096, cut to the cores this process may use)"),
    (1, 1, "1 thread per process (--threads)"),
])
def test_threads_asked_for_are_at_most_the_usable_cores(monkeypatch, asked, used, said):
    # 4,096 threads on 2 cores wait on each other: a step of 0.1 s took minutes.
    import cifar_inception.training.setup as setup
    from cifar_inception.distributed import DistContext
    from cifar_inception.recipes import build_config

    monkeypatch.setattr(setup, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    try:
        threads, _, line = setup.fit_cpu(build_config("test-tiny", "default",
                                                      num_threads=asked), DistContext())
        assert threads == used == torch.get_num_threads() and said in line
    finally:
        torch.set_num_threads(before)


def test_a_cuda_device_this_machine_lacks_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(CifarInceptionError, match="'cuda:7' asked for, but this machine has "
                                                  "1 CUDA device"):
        pick_device("cuda:7")
