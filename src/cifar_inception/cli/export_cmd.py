"""``cifar-inception export CHECKPOINT --format onnx|pt2|torchscript [-o OUT]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from cifar_inception.cli.common import add_command, add_weights_arg

DESCRIPTION = """\
Export a trained model (a run folder, whose best.pt is used, or a .pt checkpoint) as one
file that is usable alone:

  input   images         uint8 (N, S, S, 3): RGB, 0-255, channels last (NHWC), S the
                         image size the model was trained on (32 unless train's
                         --image-size said otherwise; the checkpoint records it);
                         the normalisation is done inside the model
  output  logits         float32 (N, number of classes)
          probabilities  float32 (N, number of classes), the softmax of the logits

The batch dimension is dynamic. Class names, mean and std, image size, model name and
options, parameter count and known metrics travel in the file (ONNX metadata_props; the extra file
cifar_inception.json in .pt2 and TorchScript archives).

Formats: onnx (ONNX Runtime and other runtimes; `predict` and `serve` accept the .onnx
file and then run without PyTorch), pt2 (torch.export: torch.export.load(f).module()),
torchscript (torch.jit.load(f), for LibTorch; deprecated upstream in favour of pt2).
The exported file is checked against PyTorch before it is written.
"""


# The choices of cifar_inception.export.FORMATS, spelled out so that --help needs no import.
FORMATS = ("onnx", "pt2", "torchscript")


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "export", run,
        help="export a trained model to ONNX, torch.export (.pt2) or TorchScript",
        description=DESCRIPTION)
    parser.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?", default=None,
                        help="run folder or .pt checkpoint")
    add_weights_arg(parser)
    parser.add_argument("-f", "--format", choices=FORMATS, default="onnx",
                        help="file format (default: onnx)")
    parser.add_argument("-o", "--output", metavar="OUT", default=None,
                        help="output file (default: beside the checkpoint, e.g. best.onnx, "
                             "best.pt2, best.torchscript.pt; for --weights, NAME.onnx ... in "
                             "the current folder)")
    parser.add_argument("--opset", type=int, default=None, metavar="N",
                        help="ONNX opset version (default: a current one, 20)")


def run(args: argparse.Namespace) -> int:
    from cifar_inception.export import default_output, export_model
    from cifar_inception.pretrained import model_source

    source = model_source(args.checkpoint, args.weights)
    output = args.output
    if output is None and not source.is_run:  # not into the package or the cache
        output = default_output(Path(source.path.name), args.format)
    options = {} if args.opset is None else {"opset": args.opset}
    result = export_model(source.path, output, fmt=args.format, **options)
    what = f"ONNX opset {result.opset}" if result.format == "onnx" else result.format
    meta = result.metadata
    print(f"wrote {result.path} ({what}, {result.num_bytes / 1e6:.1f} MB): {meta['model']}, "
          f"{meta['params']:,} parameters, {meta['num_classes']} classes")
    side = meta["image_size"]
    print(f"  input  images: uint8 (N, {side}, {side}, 3) RGB 0-255; outputs: logits, "
          "probabilities")
    print(f"  checked against PyTorch: max logit difference {result.max_abs_diff:.2g}")
    return 0
