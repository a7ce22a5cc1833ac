"""``cifar-inception serve [CHECKPOINT_OR_ONNX]``: the demo page and JSON API, with uvicorn."""

from __future__ import annotations

import argparse
import math

from cifar_inception.cli.common import (
    add_command,
    add_device_arg,
    add_weights_arg,
    positive_int,
    terminal_text,
)

DESCRIPTION = """\
Serve a trained model (a run folder, a .pt checkpoint or an exported .onnx file; or
--weights NAME; with neither, the package's default shipped weights) as a web page, where images can be chosen, dropped or pasted and are shown at the model's image size (32x32
unless it was trained with another --image-size) beside their top-5 classes, and as a JSON
API:

  POST /api/predict   multipart/form-data, one or more image files -> top classes per file
  GET  /api/model     model name, options, parameters, classes, image size, test accuracy
  GET  /api/health    {"status": "ok"}

A request body over --max-upload-mb, or images totalling over 100 megapixels, gets 413; a
file that is not a readable PNG, JPEG, GIF, BMP, WebP or TIFF image (or is over 40
megapixels, a possible decompression bomb) gets 400 with a message, for the whole request.
The server binds to 127.0.0.1 by default: there is no authentication, so think before
using --host 0.0.0.0.
"""


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535, not {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0 (inf and nan are refused, as no size)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {text}")
    return value


# The server's upload budget for all requests in flight together (UPLOAD_BUDGET_BYTES in
# serve.app, which needs the [serve] extra to import), in MiB: no larger request is accepted.
MAX_UPLOAD_MB = 256


def upload_mb(text: str) -> float:
    """argparse type: a request size in MiB, above 0 and at most :data:`MAX_UPLOAD_MB`."""
    value = positive_float(text)
    if value > MAX_UPLOAD_MB:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_UPLOAD_MB} (the server's "
                                         f"upload budget for all requests together), not {text}")
    return value


def register(subparsers) -> None:
    parser = add_command(subparsers, "serve", run,
                         help="serve a web demo page and JSON API for a trained model",
                         description=DESCRIPTION)
    parser.add_argument("model", metavar="CHECKPOINT_OR_ONNX", nargs="?", default=None,
                        help="run folder, .pt checkpoint or exported .onnx file (default: "
                             "the shipped default weights)")
    add_weights_arg(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=port_number, default=8000,
                        help="port to listen on; 0 picks a free one (default: 8000)")
    parser.add_argument("--max-upload-mb", type=upload_mb, default=10.0, metavar="MB",
                        help=f"largest request body accepted, in MiB, at most {MAX_UPLOAD_MB} "
                             "(default: 10)")
    parser.add_argument("--max-files", type=positive_int, default=64, metavar="N",
                        help="most image files in one request (default: 64)")
    add_device_arg(parser, "for a PyTorch checkpoint")
    parser.add_argument("--no-access-log", action="store_true",
                        help="do not log every request")


def run(args: argparse.Namespace) -> int:
    from cifar_inception.errors import needs_extra
    from cifar_inception.inference import load_classifier
    from cifar_inception.pretrained import model_source

    with needs_extra("serve", "serve"):
        import python_multipart  # noqa: F401  (Starlette reads uploads with it)
        import uvicorn  # noqa: F401

        from cifar_inception.serve import create_app
        from cifar_inception.serve.server import (
            is_loopback,
            open_listener,
            run_server,
            url_of,
        )

    max_upload_bytes = max(1, int(args.max_upload_mb * 1024 * 1024))
    source = model_source(args.model, args.weights, default=True)
    classifier = load_classifier(source.path, device=args.device)
    if not source.is_run:
        print(f"using {source.describe()}", flush=True)
    app = create_app(classifier, max_upload_bytes, max_files=args.max_files)
    sock = open_listener(args.host, args.port)
    params = classifier.info.get("params")
    size = f", {params:,} parameters" if params else ""
    print(f"serving {terminal_text(classifier.model_name)}{size} at {url_of(sock)} "
          "(Ctrl+C to stop)", flush=True)
    if not is_loopback(sock):
        print("note: reachable from other machines, with no authentication", flush=True)
    run_server(app, sock, access_log=not args.no_access_log)
    return 0
