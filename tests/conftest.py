"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
JPEG_ARCHIVE = Path(
    os.environ.get("CIFAR_INCEPTION_JPEG_ARCHIVE",
                   REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
)


@pytest.fixture(scope="session")
def jpeg_archive() -> Path:
    """The JPEG copy of CIFAR-10 beside the checkout; tests that need real data skip without it."""
    if not JPEG_ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 data not found at {JPEG_ARCHIVE} "
                    "(set CIFAR_INCEPTION_JPEG_ARCHIVE to its path)")
    return JPEG_ARCHIVE
