"""CIFAR-10's names, files, sizes and limits, and the small helpers the data modules share."""

from __future__ import annotations

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
BATCH_FILES = (*TRAIN_BATCHES, TEST_BATCH, META_FILE)

ENV_DATA = "CIFAR_INCEPTION_DATA"
ENV_CACHE = "CIFAR_INCEPTION_CACHE"
ENV_URL = "CIFAR_INCEPTION_URL"  # a mirror of the official archive (its MD5 is still checked)

APP_NAME = "cifar-inception"
SPLITS = ("train", "test")
IMAGE_SIZE = 32

# Bounds on what a source may make us read into memory. An official batch is 31 MB; a 32x32
# image file is a few kilobytes even with generous metadata.
MAX_BATCH_BYTES = 256 << 20
MAX_IMAGE_BYTES = 4 << 20
# All the files read from one source together: the official batches are 178 MB, a tree of
# the 60,000 images about 150 MB as PNG and 190 MB as BMP. Without it, a small archive of
# images each padded to just under MAX_IMAGE_BYTES would be read into gigabytes of memory.
MAX_SOURCE_BYTES = 256 << 20


def _progress_bar(enabled: bool, **options):  # noqa: ANN202
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(leave=False, disable=None, **options)  # None: drawn only on a terminal


def _one_line(exc: object) -> str:
    return " ".join(str(exc).split())[:300]
