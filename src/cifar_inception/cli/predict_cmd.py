"""``cifar-inception predict [CHECKPOINT] IMAGE_OR_FOLDER...``: top-k classes per image file."""

from __future__ import annotations

import argparse
import sys

from cifar_inception.cli.common import (
    add_command,
    add_device_arg,
    add_weights_arg,
    positive_int,
    terminal_line,
)

DESCRIPTION = """\
Classify image files with a trained model: a run folder (its best.pt, else last.pt), a .pt
checkpoint or an exported .onnx file, given first; or --weights NAME; or, with neither, the
package's default shipped weights (its first line says which). The first argument is the
model unless it is an image file or a folder that is not a run folder.

Images of any size and mode are accepted: transparent pixels are composited on white,
greyscale, palette and 16-bit images are converted to 8-bit RGB, and the whole image is
squeezed to the model's image size, 32x32 unless it was trained with another --image-size
(no crop, aspect ratio not kept), with Pillow's antialiased bicubic filter, as CIFAR-10's
images were made from whole photos. An image already that size is used as it is. Folders are walked recursively for .png .jpg .jpeg .bmp .gif .webp .tif .tiff files.
Only those formats and only regular files are read (a named pipe is skipped, not waited
on). Images over 40 megapixels are refused unread (decompression-bomb guard).

A file that cannot be read is reported on stderr and skipped; the exit status is then 1.
"""


def register(subparsers) -> None:
    parser = add_command(subparsers, "predict", run,
                         help="classify image files with a trained model",
                         description=DESCRIPTION)
    parser.add_argument("paths", metavar="[CHECKPOINT] IMAGE_OR_FOLDER", nargs="+",
                        help="a run folder, .pt or .onnx file (optional), then image files "
                             "and folders of images")
    add_weights_arg(parser)
    parser.add_argument("-k", "--top-k", type=positive_int, default=5, metavar="K",
                        help="how many classes to show per image (default: 5)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document instead of text")
    add_device_arg(parser, "for a PyTorch checkpoint")


def format_prediction(result, width: int) -> str:
    lines = [terminal_line(result.path)]
    for rank, (name, prob) in enumerate(result.top, start=1):
        bar = "#" * round(prob * 20)
        lines.append(f"  {rank}. {terminal_line(name):<{width}} {prob * 100:6.2f}%  {bar}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from cifar_inception.errors import CifarInceptionError
    from cifar_inception.fileio import to_json
    from cifar_inception.images import find_images
    from cifar_inception.inference import load_classifier
    from cifar_inception.predict import iter_predictions, split_model_argument
    from cifar_inception.pretrained import model_source

    model, paths = split_model_argument(args.paths, weights_given=args.weights is not None)
    if not find_images(paths):
        raise CifarInceptionError("no image files found in " + ", ".join(paths))
    source = model_source(model, args.weights, default=True)
    classifier = load_classifier(source.path, device=args.device)
    if not source.is_run:  # say which weights answer, as they were not named by a path
        print(f"cifar-inception: using {source.describe()}",
              file=sys.stderr if args.json else sys.stdout, flush=True)
    width = max(len(terminal_line(name)) for name in classifier.classes)

    results, failed = [], 0
    for result in iter_predictions(classifier, paths, top_k=args.top_k):
        if not result.ok:
            failed += 1
            print(f"cifar-inception: skipped {terminal_line(result.error)}", file=sys.stderr)
        if args.json:
            results.append(result.to_dict())
        elif result.ok:
            print(format_prediction(result, width), flush=True)

    if args.json:
        document = {"model": classifier.info, "classes": list(classifier.classes),
                    "top_k": min(args.top_k, len(classifier.classes)), "results": results}
        print(to_json(document, indent=2))
    if failed:
        print(f"cifar-inception: {failed} file(s) could not be read", file=sys.stderr)
    return 1 if failed else 0
