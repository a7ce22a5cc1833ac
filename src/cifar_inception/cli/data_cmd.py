"""``cifar-inception data``: load CIFAR-10 (downloading it if needed) and describe it."""

from __future__ import annotations

import argparse
import sys

from cifar_inception.cli.common import add_command, add_data_args, terminal_text
from cifar_inception.data.specs import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "data", run,
        help="load CIFAR-10 (downloading it on first use) and describe it",
        description=(
            "Load CIFAR-10, downloading it on first use, and print where it came from, its "
            "checksum, the images per split and class, and the per-channel mean and std of "
            "the training split. Decoded arrays are cached, so later loads take well under "
            "a second."
        ),
    )
    add_data_args(parser)
    from cifar_inception.data.specs import dataset_names

    parser.add_argument("--dataset", choices=dataset_names(), default=None, metavar="NAME",
                        help="the dataset: " + ", ".join(dataset_names()) + " (default: "
                             "cifar10, or the classes of an image-folder tree)")
    parser.add_argument("--grid", metavar="FILE.png", default=None,
                        help="also write a figure of 10 random training images per class, "
                             "one labelled row per class")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of the validation split and of the grid's picks (default 0)")
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help=f"resize every image to N x N pixels, as train --image-size "
                             f"does ({MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}; default: the "
                             "dataset's, 32 for CIFAR): the statistics are then those a run "
                             "at that size normalises with")
    parser.add_argument("--val-size", type=int, default=5000, metavar="N",
                        help="training images held out for validation, stratified by class "
                             "(default 5000; 0 keeps all 50,000 for training)")


def run(args: argparse.Namespace) -> int:
    from cifar_inception.data import channel_stats, load_dataset, split_train_val

    if args.grid:  # a bad path is refused before the data is loaded and described
        from cifar_inception.plots import check_figure_path

        check_figure_path(args.grid)
    data = load_dataset(args.dataset, args.data_dir, image_size=args.image_size,
                        download=not args.no_download, progress=sys.stderr.isatty())
    train_x, train_y, _, val_y = split_train_val(data.train_images, data.train_labels,
                                                 val_size=args.val_size, seed=args.seed)
    mean, std = channel_stats(train_x)

    print(f"source    {terminal_text(data.source)}")
    print(f"checksum  {data.checksum}")
    side = data.train_images.shape[1]
    print(f"images    {side} x {side} pixels, {len(data.classes)} classes")
    if data.cache_file is not None:
        state = "read from the cache" if data.from_cache else "decoded, now cached"
        print(f"cache     {data.cache_file} ({state})")
    print()
    # The official splits first (training, test), then how training is divided for model selection.
    _print_counts(data.classes, {"training": data.train_labels, "test": data.test_labels,
                                 "train": train_y, "val": val_y})
    print()
    if len(val_y):
        print(f"validation: {len(val_y):,} of the {len(data.train_labels):,} training images, "
              f"stratified by class, seed {args.seed}")
    else:
        print(f"validation: none (--val-size 0); all {len(data.train_labels):,} training "
              "images train")
    print(f"mean and std per channel of the {len(train_y):,} training images:")
    print(f"{'':12}{'red':>9}{'green':>9}{'blue':>9}")
    for name, values, scale, fmt in (("mean 0-255", mean, 255.0, ".2f"),
                                     ("std  0-255", std, 255.0, ".2f"),
                                     ("mean 0-1", mean, 1.0, ".4f"),
                                     ("std  0-1", std, 1.0, ".4f")):
        print(f"{name:12}" + "".join(f"{v * scale:>9{fmt}}" for v in values))

    if args.grid:
        from cifar_inception.plots import class_grid

        path = class_grid(data.train_images, data.train_labels, data.classes, args.grid,
                          per_class=10, seed=args.seed)
        print()
        print(f"grid      {path} (10 random training images per class, seed {args.seed})")
    return 0


def _print_counts(classes: tuple[str, ...], splits: dict) -> None:
    import numpy as np

    counts = {name: np.bincount(labels, minlength=len(classes)) for name, labels in
              splits.items()}
    shown = [terminal_text(c) for c in classes]
    width = max(len(c) for c in shown) + 2
    print(f"{'class':<{width}}" + "".join(f"{name:>10}" for name in splits))
    for index, cls in enumerate(shown):
        print(f"{cls:<{width}}" + "".join(f"{counts[name][index]:>10,}" for name in splits))
    print(f"{'total':<{width}}" + "".join(f"{len(labels):>10,}" for labels in splits.values()))
