"""Training and inference throughput (images per second) of registered models.

    python benchmarks/throughput.py                          # every model, batch 256, auto device
    python benchmarks/throughput.py --models inception-cpu googlenet:width=0.25 \\
        --batch-size 512 --amp --channels-last --json /tmp/throughput.json
    python benchmarks/throughput.py --peak                   # the machine's matmul/conv rate

A model is ``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE`` (its builder options). Each is timed on
random normalised inputs already on the device, so the figures are the model's own cost
(the data pipeline is measured by ``profile_epoch.py``): a training step is forward,
cross-entropy (auxiliary heads included, weighted by the model's defaults), backward and a
Nesterov SGD step; inference is an eval-mode forward without gradients.

Timing: ``--warmup`` untimed steps first (with ``--compile`` the first of them compiles, and
that time is reported on its own as ``compile_s``), then ``--steps`` timed steps; on CUDA
the time comes from CUDA events after a synchronisation. ``gflops`` is the achieved rate,
counting 2 FLOPs per multiply-add and a training step as three forward passes.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import Timer, describe, environment, format_table, pick_device, write_json
from cifar_inception.models import create_model, list_models
from cifar_inception.models.registry import parse_options
from cifar_inception.summary import count_macs

COLUMNS = ("model", "params", "mmacs", "batch", "train_img_s", "train_gflops",
           "infer_img_s", "infer_gflops", "compile_s")


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``googlenet:width=0.25,aux_logits=false`` -> ("googlenet", {...})."""
    name, _, options = spec.partition(":")
    pairs = [p for p in options.split(",") if p]
    return name, parse_options(pairs)


def _loss(output: Any, targets: torch.Tensor, aux_weights: tuple[float, ...]) -> torch.Tensor:
    logits, aux = (output.logits, output.aux_logits) if hasattr(output, "aux_logits") \
        else (output, ())
    loss = F.cross_entropy(logits.float(), targets)
    for weight, aux_logits in zip(aux_weights, aux):
        loss = loss + weight * F.cross_entropy(aux_logits.float(), targets)
    return loss


def measure_model(name: str, options: dict[str, Any], *, batch_size: int,
                  device: torch.device, steps: int, warmup: int, amp: bool,
                  channels_last: bool, compile_model: bool, modes: tuple[str, ...]
                  ) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_model(name, **options)
    macs = count_macs(model)
    model = model.to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    net: nn.Module = torch.compile(model) if compile_model else model
    x = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    aux_weights = tuple(getattr(model, "default_aux_weights", ()))
    timer = Timer(device)
    row: dict[str, Any] = {"model": _label(name, options), "params":
                           sum(p.numel() for p in model.parameters()),
                           "mmacs": round(macs / 1e6, 2), "batch": batch_size}
    compile_s = 0.0

    def train_step() -> None:
        with autocast:
            output = net(x)
        loss = _loss(output, y, aux_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer_step() -> None:
        with autocast:
            net(x)

    for mode, step, flops_per_image in (("train", train_step, 6 * macs),
                                        ("infer", infer_step, 2 * macs)):
        if mode not in modes:
            continue
        model.train(mode == "train")
        for index in range(warmup):
            seconds = timer(step)
            if index == 0 and compile_model:
                compile_s += seconds  # the first call of each mode compiles its graph
        seconds = timer(lambda: [step() for _ in range(steps)])
        images_per_s = steps * batch_size / seconds
        row[f"{mode}_img_s"] = round(images_per_s, 1)
        row[f"{mode}_gflops"] = round(images_per_s * flops_per_image / 1e9, 1)
    row["compile_s"] = round(compile_s, 1) if compile_model else None
    return row


def _label(name: str, options: dict[str, Any]) -> str:
    if not options:
        return name
    return name + ":" + ",".join(f"{k}={v}" for k, v in options.items())


def peak_rates(device: torch.device, *, size: int = 2048, repeats: int = 10
               ) -> list[dict[str, Any]]:
    """Achieved GFLOP/s of a large matmul and of a 3x3 convolution (forward + backward),
    fp32 and bf16: the machine's practical ceiling for this kind of work. A CPU without
    native bf16 gets fp32 only: its bf16 kernels are emulated one element at a time, and
    would take minutes to say what the training benchmark already shows."""
    from cifar_inception.devices import cpu_capability, has_native_bf16

    timer = Timer(device)
    rows = []
    dtypes = [torch.float32]
    if device.type == "cuda" or (cpu_capability().upper().startswith("AVX512")
                                 and has_native_bf16()):  # as training decides it
        dtypes.append(torch.bfloat16)
    for dtype in dtypes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        timer(lambda: a @ b)
        seconds = timer(lambda: [a @ b for _ in range(repeats)])
        rows.append({"kernel": f"matmul {size}x{size}", "dtype": str(dtype).split(".")[1],
                     "gflops": round(2 * size ** 3 * repeats / seconds / 1e9, 1)})
        conv = nn.Conv2d(128, 128, 3, padding=1, bias=False).to(device, dtype)
        conv = conv.to(memory_format=torch.channels_last)
        x = torch.randn(256, 128, 16, 16, device=device, dtype=dtype,
                        requires_grad=True).contiguous(memory_format=torch.channels_last)

        def conv_step() -> None:
            conv(x).sum().backward()

        conv_step()
        seconds = timer(lambda: [conv_step() for _ in range(repeats)])
        flops = 3 * 2 * 256 * 128 * 128 * 9 * 16 * 16 * repeats
        rows.append({"kernel": "conv3x3 128->128 16x16 fwd+bwd, batch 256",
                     "dtype": str(dtype).split(".")[1], "gflops": round(flops / seconds / 1e9, 1)})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None, metavar="SPEC",
                        help="NAME or NAME:KEY=VALUE,... (default: every registered model)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast (CPU and CUDA)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--modes", default="train,infer",
                        help="train, infer, or both: train,infer (also spelt both)")
    parser.add_argument("--reuse-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="keep freed memory for reuse, as CPU training does (for the whole "
                             "process: compare in two calls)")
    parser.add_argument("--peak", action="store_true",
                        help="also measure the machine's matmul and convolution rates")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)

    threads_before = torch.get_num_threads()
    if args.reuse_memory:
        from cifar_inception.devices import reuse_freed_memory

        reuse_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads_before)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    env = environment(device)
    settings = {"batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
                "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile,
                "reuse_memory": args.reuse_memory}
    specs = args.models or list_models()
    rows, failures = [], []
    for spec in specs:
        name, options = parse_spec(spec)
        started = time.perf_counter()
        try:
            rows.append(measure_model(
                name, options, batch_size=args.batch_size, device=device, steps=args.steps,
                warmup=args.warmup, amp=args.amp, channels_last=args.channels_last,
                compile_model=args.compile,
                modes=tuple(args.modes.replace("both", "train,infer").split(","))))
        except (RuntimeError, MemoryError) as exc:  # e.g. out of memory for a huge model
            failures.append({"model": spec, "error": str(exc).splitlines()[0]})
            print(f"{spec}: failed: {failures[-1]['error']}", file=sys.stderr)
            continue
        print(f"{spec}: done in {time.perf_counter() - started:.1f}s", flush=True)
    peak = peak_rates(device) if args.peak else []
    result = {"benchmark": "throughput", "environment": env, "settings": settings,
              "rows": rows, "failures": failures, "peak": peak}
    write_json(args.json, result)
    print(f"\nThroughput, {describe(env)}; batch {args.batch_size}, amp={args.amp}, "
          f"channels_last={args.channels_last}, compile={args.compile}, "
          f"reuse_memory={args.reuse_memory}")
    print(format_table(rows, COLUMNS))
    if peak:
        print("\nMachine rate")
        print(format_table(peak, ("kernel", "dtype", "gflops")))
    return result


if __name__ == "__main__":
    main()
