"""Where data goes, the limits on what a source may make us read, and small shared helpers.

What makes each dataset what it is lives in :mod:`~cifar_inception.data.specs`.
"""

from __future__ import annotations

__all__ = ["APP_NAME", "ENV_CACHE", "ENV_DATA", "MAX_BATCH_BYTES", "MAX_IMAGE_BYTES",
           "MAX_SOURCE_BYTES", "SPLITS", "one_line", "progress_bar"]

ENV_DATA = "CIFAR_INCEPTION_DATA"
ENV_CACHE = "CIFAR_INCEPTION_CACHE"

APP_NAME = "cifar-inception"
SPLITS = ("train", "test")

# Bounds on what a source may make us read into memory. An official batch is 31 MB; a 32x32
# image file is a few kilobytes even with generous metadata.
MAX_BATCH_BYTES = 256 << 20
MAX_IMAGE_BYTES = 4 << 20
# All the files read from one source together: the official batches are 178 MB, a tree of
# the 60,000 images about 150 MB as PNG and 190 MB as BMP. Without it, a small archive of
# images each padded to just under MAX_IMAGE_BYTES would be read into gigabytes of memory.
MAX_SOURCE_BYTES = 256 << 20


def progress_bar(enabled: bool, **options):  # noqa: ANN202
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(leave=False, disable=None, **options)  # None: drawn only on a terminal


def one_line(exc: object) -> str:
    return " ".join(str(exc).split())[:300]
