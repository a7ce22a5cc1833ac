"""Load check for ``cifar-inception serve``: requests/s and latency of single-image predictions.

Starts the server in a subprocess on a free loopback port, then sends POST /api/predict
requests, one image each, from this process: a few client threads, each on its own
keep-alive connection (standard library only). Every round is bounded in count and time.

    python benchmarks/serve_load.py                      # random-weight googlenet, width 1
    python benchmarks/serve_load.py runs/googlenet       # a run folder, checkpoint or .onnx
    python benchmarks/serve_load.py --onnx                # the same, exported to ONNX
    python benchmarks/serve_load.py --width 0.25 --requests 300 --duration 20 --rounds 3
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None,
                        help="run folder, .pt checkpoint or .onnx file (default: a randomly "
                             "initialised model, see --arch and --width)")
    parser.add_argument("--arch", default="googlenet", help="model for the default (googlenet)")
    parser.add_argument("--width", type=float, default=1.0, help="its width (default: 1.0)")
    parser.add_argument("--onnx", action="store_true",
                        help="export that model to ONNX and serve the .onnx file")
    parser.add_argument("--requests", type=int, default=500, help="per round (default: 500)")
    parser.add_argument("--duration", type=float, default=30.0,
                        help="seconds per round at most (default: 30)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="client threads, one connection each (default: 4)")
    parser.add_argument("--warmup", type=int, default=20, help="requests not counted (default: 20)")
    parser.add_argument("--rounds", type=int, default=1, help="measured rounds (default: 1)")
    parser.add_argument("--image", default=None,
                        help="image file to send (default: a drawn 32x32 PNG)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser.parse_args()


def default_image() -> bytes:
    """A made-up 32x32 picture, PNG-encoded: the size the model takes, so no resizing."""
    image = Image.new("RGB", (32, 32), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 20, 32, 32], fill=(30, 90, 150))
    draw.polygon([(8, 20), (24, 20), (21, 24), (11, 24)], fill=(120, 60, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def random_checkpoint(folder: Path, arch: str, width: float) -> Path:
    import torch

    from cifar_inception import checkpoint as ckpt_mod
    from cifar_inception.data import CLASSES
    from cifar_inception.models import create_model

    torch.manual_seed(0)
    options = {"width": width}
    model = create_model(arch, **options)
    path = folder / "best.pt"
    ckpt_mod.save_checkpoint(path, ckpt_mod.make_checkpoint(
        model_name=arch, model_options=options, num_classes=10, classes=list(CLASSES),
        mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616],
        state_dict=model.state_dict()))
    return path


def start_server(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cifar_inception", "serve", str(model), "--port", "0",
             "--no-access-log"], stdout=subprocess.PIPE, stderr=err, text=True)
    first = proc.stdout.readline()
    if " at http://" not in first:
        proc.kill()
        raise SystemExit(f"server did not start: {first!r}\n{log.read_text()}")
    url = first.split(" at ")[1].split()[0]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            status, _ = request(url, "GET", "/api/health")
            if status == 200:
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server never became healthy\n{log.read_text()}")


def request(url: str, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None, conn: http.client.HTTPConnection | None = None):
    parts = urllib.parse.urlsplit(url)
    own = conn is None
    conn = conn or http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


def multipart(image: bytes, name: str) -> tuple[bytes, str]:
    boundary = "loadcheck7d41"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    body += image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def load_round(url: str, body: bytes, content_type: str, *, requests: int, duration: float,
               concurrency: int) -> dict:
    """Send up to ``requests`` predictions within ``duration`` seconds; latencies in ms."""
    parts = urllib.parse.urlsplit(url)
    headers = {"Content-Type": content_type}
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    issued = 0
    deadline = time.perf_counter() + duration

    def take_ticket() -> bool:
        nonlocal issued
        with lock:
            if issued >= requests or time.perf_counter() >= deadline:
                return False
            issued += 1
            return True

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            while take_ticket():
                start = time.perf_counter()
                try:
                    status, data = request(url, "POST", "/api/predict", body, headers, conn)
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    with lock:
                        errors.append(repr(exc))
                    continue
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    if status == 200 and json.loads(data)["results"]:
                        latencies.append(elapsed)
                    else:
                        errors.append(f"HTTP {status}")
        finally:
            conn.close()

    began = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    ms = np.array(latencies) if latencies else np.array([np.nan])
    return {"ok": len(latencies), "errors": len(errors), "seconds": round(seconds, 2),
            "requests_per_s": round(len(latencies) / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "max_ms": round(float(ms.max()), 1),
            "first_error": errors[0] if errors else None}


def main() -> int:
    args = parse_args()
    image = Path(args.image).read_bytes() if args.image else default_image()
    body, content_type = multipart(image, Path(args.image).name if args.image else "x.png")
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        if args.model:
            model = Path(args.model)
        else:
            model = random_checkpoint(Path(tmp), args.arch, args.width)
            if args.onnx:
                from cifar_inception.export import export_onnx

                model = export_onnx(model, Path(tmp) / "model.onnx").path
        proc, url = start_server(model, Path(tmp) / "server.log")
        try:
            status, data = request(url, "GET", "/api/model")
            info = json.loads(data)
            load_round(url, body, content_type, requests=args.warmup, duration=60,
                       concurrency=args.concurrency)
            rounds = [load_round(url, body, content_type, requests=args.requests,
                                 duration=args.duration, concurrency=args.concurrency)
                      for _ in range(args.rounds)]
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    import torch

    setup = {"model": info["model"], "options": info["options"], "format": info["format"],
             "parameters": info["parameters"], "image_bytes": len(image),
             "concurrency": args.concurrency, "cpus": os.cpu_count(),
             "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
             "python": platform.python_version()}
    if args.json:
        print(json.dumps({"setup": setup, "rounds": rounds}, indent=2))
        return 0
    print(f"model {setup['model']} {setup['options']} ({setup['format']}, "
          f"{setup['parameters']:,} parameters); image {len(image)} bytes; "
          f"{args.concurrency} client threads; {os.cpu_count()} CPUs; torch {torch.__version__}")
    for i, r in enumerate(rounds, 1):
        print(f"round {i}: {r['ok']} ok, {r['errors']} errors in {r['seconds']} s: "
              f"{r['requests_per_s']} requests/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
              f"max {r['max_ms']} ms" + (f" (first error: {r['first_error']})"
                                         if r["errors"] else ""))
    if len(rounds) > 1:
        for key, unit in (("requests_per_s", "requests/s"), ("p50_ms", "ms"), ("p99_ms", "ms")):
            values = [r[key] for r in rounds]
            print(f"{key}: mean {statistics.mean(values):.1f} {unit}, "
                  f"min {min(values)}, max {max(values)}, sd {statistics.stdev(values):.1f}")
    return 0 if all(r["errors"] == 0 for r in rounds) else 1


if __name__ == "__main__":
    raise SystemExit(main())
