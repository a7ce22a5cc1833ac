"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Every test gets its own decoded-array cache and no data folder or mirror from the
    environment: nothing reads or writes the user's cache."""
    monkeypatch.setenv("CIFAR_INCEPTION_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CIFAR_INCEPTION_DATA", raising=False)
    monkeypatch.delenv("CIFAR_INCEPTION_URL", raising=False)


@pytest.fixture
def one_thread():
    """One thread: tiny batches gain nothing from two, and on a busy machine a second thread
    mostly waits for the first."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
