"""Where data goes, the limits on what a source may make us read, and small shared helpers.

What makes each dataset what it is lives in :mod:`~cifar_inception.data.specs`.
"""

from __future__ import annotations

from cifar_inception.errors import DataError

__all__ = ["APP_NAME", "ENV_CACHE", "ENV_DATA", "MAX_ARCHIVE_MEMBERS", "MAX_BATCH_BYTES",
           "MAX_DECODED_BYTES", "MAX_IMAGE_BYTES", "MAX_SOURCE_BYTES", "MAX_UNPACKED_BYTES",
           "SPLITS", "check_decoded_size", "one_line", "progress_bar"]

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
# What one source's images may take decoded, at the size asked for (images x size x size x 3
# bytes): CIFAR-10 takes 184 MB at 32 pixels and 2.9 GB at 128. Read bytes do not bound it: a
# 69-byte PNG of one pixel decodes to 48 KB at 128 pixels, and CIFAR-10 at 512 would be 47 GB.
# Decoding, ordering and caching hold about three times this at their peak.
MAX_DECODED_BYTES = 3 << 30
# Members of one archive, folders included: tarfile keeps every header it has read (about
# 400 bytes each), and 400,000 empty folder headers gzip to under a megabyte.
MAX_ARCHIVE_MEMBERS = 1_000_000
# What a compressed tar may unpack to, read or skipped: every byte of it is decompressed to
# reach the next member (CIFAR-10's official tar is 178 MB unpacked), and 100 GB of zeros
# compress to some 100 MB.
MAX_UNPACKED_BYTES = 2 << 30


def check_decoded_size(images: int, size: int, label: str) -> None:
    """Refuse, before they are decoded, ``images`` images that at ``size`` x ``size`` would
    take more than :data:`MAX_DECODED_BYTES`."""
    need = images * size * size * 3
    if need > MAX_DECODED_BYTES:
        raise DataError(f"{label}: {images:,} images of {size}x{size} pixels would take "
                        f"{need / 2**30:.1f} GiB decoded, over the limit of "
                        f"{MAX_DECODED_BYTES / 2**30:.0f} GiB; ask for a smaller --image-size")


def progress_bar(enabled: bool, **options):  # noqa: ANN202
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(leave=False, disable=None, **options)  # None: drawn only on a terminal


def one_line(exc: object) -> str:
    return " ".join(str(exc).split())[:300]
