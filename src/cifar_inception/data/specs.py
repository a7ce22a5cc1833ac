"""Dataset specs: everything that makes CIFAR-10, CIFAR-100 or an image-folder tree what it is.

A spec is the one place a dataset is described. The readers (batches, trees, download, cache)
take a spec rather than reading constants, so adding a dataset is adding a spec here and
naming it in :data:`SPECS`. Like torchvision's ``CIFAR100``, CIFAR-100 is CIFAR-10's spec
with a few fields replaced.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

from cifar_inception.errors import DataError

__all__ = [
    "CIFAR10", "CIFAR100", "CIFAR100_COARSE", "DEFAULT_IMAGE_SIZE", "IMAGE_FOLDER", "MAX_CLASSES",
    "SPECS", "DatasetSpec", "check_image_size", "dataset_names", "get_spec",
]

DEFAULT_IMAGE_SIZE = 32
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 512
# The most classes a dataset, a model or a checkpoint may have (ImageNet's 1,000): a model of
# 10**9 classes would ask for half a terabyte.
MAX_CLASSES = 1000


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset, frozen: where it comes from, how its archive is laid out, what it holds.

    ``classes`` empty means "read them from the data": from the ``meta_file``'s
    ``label_names_key`` for the official batches, from the folder names (sorted) for an
    image-folder tree. ``mean`` and ``std`` are reference values on the 0-1 scale (training
    computes its own from the training split).
    """

    name: str                           # what --dataset takes and records name
    title: str                          # for messages: "CIFAR-10"
    classes: tuple[str, ...] = ()
    url: str | None = None              # the official archive; None: nothing to download
    md5: str | None = None
    url_env: str | None = None          # environment variable naming a mirror of ``url``
    archive_name: str | None = None
    batches_dir: str | None = None      # the folder the archive holds the batches in
    train_batches: tuple[str, ...] = ()
    test_batches: tuple[str, ...] = ()
    meta_file: str | None = None
    label_key: str = "labels"
    label_names_key: str = "label_names"
    image_size: int = DEFAULT_IMAGE_SIZE  # what every image is resized to
    # The size the dataset's own images all are: a tree image of another size means a broken
    # copy and is refused. None: images of any size, resized.
    native_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @property
    def batch_files(self) -> tuple[str, ...]:
        return (*self.train_batches, *self.test_batches, *((self.meta_file,)
                                                            if self.meta_file else ()))

    @property
    def has_batches(self) -> bool:
        return bool(self.batches_dir)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) or None

    def at_size(self, image_size: int | None) -> DatasetSpec:
        """This spec with its images resized to ``image_size`` (None: unchanged)."""
        if image_size is None or image_size == self.image_size:
            return self
        check_image_size(image_size)
        return replace(self, image_size=int(image_size))

    def with_classes(self, classes: tuple[str, ...]) -> DatasetSpec:
        return replace(self, classes=tuple(classes))

    def cache_key(self) -> str:
        """A short digest of what decoding depends on: the cache keys on it."""
        decoded_as = [self.name, list(self.classes), self.label_key, self.label_names_key,
                      list(self.batch_files), self.image_size]
        return hashlib.sha256(json.dumps(decoded_as).encode()).hexdigest()[:16]


def check_image_size(image_size: object) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) \
            or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise DataError(f"the image size must be a whole number from {MIN_IMAGE_SIZE} to "
                        f"{MAX_IMAGE_SIZE}, not {image_size!r}")
    return image_size


CIFAR10 = DatasetSpec(
    name="cifar10", title="CIFAR-10",
    classes=("airplane", "automobile", "bird", "cat", "deer",
             "dog", "frog", "horse", "ship", "truck"),
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    url_env="CIFAR_INCEPTION_URL",  # a mirror of the official archive (its MD5 is still checked)
    archive_name="cifar-10-python.tar.gz",
    batches_dir="cifar-10-batches-py",
    train_batches=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_batches=("test_batch",),
    meta_file="batches.meta",
    native_size=32,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
)

# The fine (100) and coarse (20) label names are read from the archive's meta file.
CIFAR100 = replace(
    CIFAR10, name="cifar100", title="CIFAR-100", classes=(),
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    url_env="CIFAR_INCEPTION_CIFAR100_URL",
    archive_name="cifar-100-python.tar.gz",
    batches_dir="cifar-100-python",
    train_batches=("train",), test_batches=("test",), meta_file="meta",
    label_key="fine_labels", label_names_key="fine_label_names",
    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
)
CIFAR100_COARSE = replace(CIFAR100, name="cifar100-coarse", title="CIFAR-100 (coarse labels)",
                          label_key="coarse_labels", label_names_key="coarse_label_names")

# Any train/<class>/ and test/<class>/ tree: its classes are its folder names, sorted.
IMAGE_FOLDER = DatasetSpec(name="image-folder", title="image folders", native_size=None)

SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in
                                 (CIFAR10, CIFAR100, CIFAR100_COARSE, IMAGE_FOLDER)}


def dataset_names() -> tuple[str, ...]:
    return tuple(SPECS)


def get_spec(spec_or_name: DatasetSpec | str) -> DatasetSpec:
    """The spec itself, or the built-in one of that name; DataError naming the choices."""
    if isinstance(spec_or_name, DatasetSpec):
        return spec_or_name
    try:
        return SPECS[str(spec_or_name).lower()]
    except KeyError:
        raise DataError(f"unknown dataset {spec_or_name!r}; choose from "
                        f"{', '.join(SPECS)}") from None
