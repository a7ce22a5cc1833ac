"""cifar_inception.data: the official batches, the cache, safe unpickling, splits and statistics.

Image-folder sources are in test_data_sources.py, downloads in test_data_download.py.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time

import numpy as np
import pytest

from cifar_inception import data
from cifar_inception.data import (
    CLASSES,
    batches,
    channel_stats,
    load_cifar10,
    one_hot,
    sources,
    split_train_val,
)
from cifar_inception.errors import DataError
from data_fixtures import (
    assert_arrays_equal,
    official_files,
    pickle_batch,
    write_official_archive,
    write_official_folder,
)


def test_classes_are_the_official_ten_in_order():
    assert CLASSES == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                       "ship", "truck")


# --- the official format ---------------------------------------------------------------------


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_loads_batches_folder(tmp_path, style):
    expected = write_official_folder(tmp_path / "cifar", style=style)
    loaded = load_cifar10(tmp_path / "cifar", download=False, progress=False)
    assert_arrays_equal(loaded, expected)
    assert loaded.classes == CLASSES
    assert loaded.train_images.flags.c_contiguous
    assert "cifar-10-batches-py" in loaded.source and "batches" in loaded.source
    assert loaded.checksum.startswith("sha256:") and len(loaded.checksum) == 7 + 64


def test_loads_the_batches_folder_itself(tmp_path):
    expected = write_official_folder(tmp_path)
    loaded = load_cifar10(tmp_path / "cifar-10-batches-py", download=False, progress=False)
    assert_arrays_equal(loaded, expected)


def test_reads_official_archive_in_place(tmp_path):
    archive = tmp_path / "in" / "cifar-10-python.tar.gz"
    expected = write_official_archive(archive, per_batch=7, test_count=5)
    for data_dir in (archive, archive.parent):  # the file, or the folder holding it
        loaded = load_cifar10(data_dir, download=False, progress=False)
        assert_arrays_equal(loaded, expected)
        assert "archive" in loaded.source
    assert sorted(os.listdir(archive.parent)) == ["cifar-10-python.tar.gz"]  # nothing unpacked


def test_checksum_is_the_sha256_of_an_archive(tmp_path):
    import hashlib

    archive = tmp_path / "cifar-10-python.tar.gz"
    write_official_archive(archive)
    loaded = load_cifar10(archive, progress=False)
    assert loaded.checksum == "sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest()


def test_incomplete_batches_folder_names_what_is_missing(tmp_path):
    write_official_folder(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="missing test_batch"):
        load_cifar10(tmp_path, progress=False)
    assert sorted(os.listdir(tmp_path / "cifar-10-batches-py"))[0] == "batches.meta"


def test_corrupt_batch_names_the_file(tmp_path):
    write_official_folder(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(DataError, match="data_batch_3: not a readable CIFAR-10 batch"):
        load_cifar10(tmp_path, progress=False)


def test_batch_with_wrong_content_is_refused(tmp_path):
    write_official_folder(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(
        pickle_batch({"data": np.zeros((3, 100), np.uint8), "labels": [0, 1, 2]}))
    with pytest.raises(DataError, match=r"data_batch_2: 'data' is not a uint8 array"):
        load_cifar10(tmp_path, progress=False)


def test_meta_with_other_class_names_is_refused(tmp_path):
    write_official_folder(tmp_path)
    names = list(CLASSES)
    names[0] = "aeroplane"
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(
        pickle_batch({"label_names": names}))
    with pytest.raises(DataError, match="aeroplane"):
        load_cifar10(tmp_path, progress=False)


def test_truncated_official_archive_is_reported(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_official_archive(archive)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt archive") as info:
        load_cifar10(archive, progress=False)
    assert "\n" not in str(info.value)
    assert archive.exists()  # the user's file stays, however broken


# --- safe unpickling -------------------------------------------------------------------------


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    write_official_folder(tmp_path / "cifar")
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"data": _RunsCommand(f"touch {marker}"), "labels": []}, protocol=2)
    (tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_1").write_bytes(evil)
    refusal = r"data_batch_1: refusing to unpickle (posix|nt|os)\.system"
    with pytest.raises(DataError, match=refusal):
        load_cifar10(tmp_path / "cifar", progress=False)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps(eval, protocol=2),                                  # builtins.eval
    pickle.dumps(shutil.rmtree, protocol=4),                         # STACK_GLOBAL
    pickle.dumps(np.array([1, "a"], dtype=object), protocol=2),      # object array
    pickle.dumps(np.arange(3), protocol=5),                          # not how batches look
    b"cnumpy\nndarray\n((I1000000000\ntS'u1'\ntR.",                 # ndarray called directly
])
def test_unpickler_refuses_everything_but_array_rebuilding(payload):
    with pytest.raises(DataError):
        batches.safe_unpickle(payload, "batch")


def test_unpickler_reads_both_pickle_styles():
    array = np.arange(24, dtype=np.uint8).reshape(2, 12)
    for style in ("py2", "py3"):
        loaded = batches.safe_unpickle(pickle_batch({"data": array}, style), "x")
        key = b"data" if style == "py2" else "data"
        np.testing.assert_array_equal(loaded[key], array)


# --- the cache -------------------------------------------------------------------------------


def test_second_load_comes_from_the_cache(tmp_path):
    expected = write_official_folder(tmp_path / "cifar")
    first = load_cifar10(tmp_path / "cifar", progress=False)
    second = load_cifar10(tmp_path / "cifar", progress=False)
    assert not first.from_cache and second.from_cache
    assert first.cache_file == second.cache_file
    assert first.cache_file.parent.parent == tmp_path / "cache"
    assert first.checksum.split(":")[1] in first.cache_file.name
    assert_arrays_equal(second, expected)
    assert second.source == first.source


def test_unchanged_source_is_neither_rehashed_nor_reread(tmp_path, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    expected = write_official_archive(archive)
    load_cifar10(archive, progress=False)

    def no_hashing(*args):
        raise AssertionError("an unchanged source was hashed again")

    monkeypatch.setattr(sources, "_hash_files", no_hashing)
    again = load_cifar10(archive, progress=False)
    assert again.from_cache
    assert_arrays_equal(again, expected)
    monkeypatch.undo()
    # Other bytes of the same size, the modification time put back (as `cp -p` or `rsync -t`
    # leave them): the inode's change time gives them away, and the damage is found.
    stat = archive.stat()
    time.sleep(0.05)  # past the file system's timestamp granularity (a few ms at worst)
    archive.write_bytes(np.random.default_rng(0).bytes(stat.st_size))
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert archive.stat().st_ctime_ns != stat.st_ctime_ns
    with pytest.raises(DataError, match="corrupt"):
        load_cifar10(archive, progress=False)


def test_corrupt_cache_file_is_rebuilt(tmp_path):
    expected = write_official_folder(tmp_path / "cifar")
    first = load_cifar10(tmp_path / "cifar", progress=False)
    first.cache_file.write_bytes(b"not an npz")
    again = load_cifar10(tmp_path / "cifar", progress=False)
    assert not again.from_cache
    assert_arrays_equal(again, expected)
    assert load_cifar10(tmp_path / "cifar", progress=False).from_cache


def test_a_cache_file_marked_encrypted_is_rebuilt(tmp_path):
    # zipfile refuses an encrypted member with a RuntimeError, not an OSError or ValueError.
    expected = write_official_folder(tmp_path / "cifar")
    cache = load_cifar10(tmp_path / "cifar", progress=False).cache_file
    blob = bytearray(cache.read_bytes())
    at = blob.index(b"PK\x01\x02")  # the first central-directory entry; its flags at +8
    blob[at + 8] |= 0x1
    cache.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match="is unreadable"):
        again = load_cifar10(tmp_path / "cifar", progress=False)
    assert not again.from_cache
    assert_arrays_equal(again, expected)


def test_unwritable_cache_warns_and_still_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(data.ENV_CACHE, str(blocker / "cache"))
    expected = write_official_folder(tmp_path / "cifar")
    with pytest.warns(UserWarning, match="could not cache"):
        loaded = load_cifar10(tmp_path / "cifar", progress=False)
    assert loaded.cache_file is None
    assert_arrays_equal(loaded, expected)


# --- where the data is -----------------------------------------------------------------------


def test_missing_data_dir_is_reported(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        load_cifar10(tmp_path / "nowhere", progress=False)
    assert "--data-dir" in str(info.value)
    assert not (tmp_path / "nowhere").exists()


def test_no_download_with_nothing_there(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="downloading is off") as info:
        load_cifar10(tmp_path / "empty", download=False, progress=False)
    assert "--data-dir" in str(info.value)
    assert os.listdir(tmp_path / "empty") == []


def test_data_dir_from_the_environment(tmp_path, monkeypatch):
    expected = write_official_folder(tmp_path / "env-data")
    monkeypatch.setenv(data.ENV_DATA, str(tmp_path / "env-data"))
    assert_arrays_equal(load_cifar10(download=False, progress=False), expected)


def test_a_file_that_is_not_an_archive(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="neither a folder nor a .zip"):
        load_cifar10(tmp_path / "notes.txt", progress=False)


# --- validation split ------------------------------------------------------------------------


def _labels(counts):
    return np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)


def test_split_is_stratified_disjoint_and_complete():
    labels = np.random.default_rng(0).permutation(_labels([100] * 10))
    images = np.arange(len(labels))  # stands for the images: row i is image i
    train_x, train_y, val_x, val_y = split_train_val(images, labels, val_size=100, seed=3)
    assert len(val_x) == 100 and len(train_x) == 900
    assert np.bincount(val_y, minlength=10).tolist() == [10] * 10
    assert not set(train_x) & set(val_x)
    assert sorted(np.concatenate([train_x, val_x])) == list(range(1000))
    np.testing.assert_array_equal(labels[train_x], train_y)
    np.testing.assert_array_equal(labels[val_x], val_y)
    assert np.all(np.diff(train_x) > 0)  # the training images keep their order


def test_split_is_seeded():
    labels = _labels([50] * 10)
    images = np.arange(len(labels))
    first = split_train_val(images, labels, val_size=50, seed=1)[2]
    again = split_train_val(images, labels, val_size=50, seed=1)[2]
    other = split_train_val(images, labels, val_size=50, seed=2)[2]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_split_of_unbalanced_classes_hits_the_exact_size():
    labels = _labels([7, 13, 1, 29, 50])
    val_y = split_train_val(np.arange(len(labels)), labels, val_size=17, seed=0)[3]
    counts = np.bincount(val_y, minlength=5)
    assert counts.sum() == 17
    ideal = np.array([7, 13, 1, 29, 50]) * 17 / 100
    assert np.all(np.abs(counts - ideal) < 1)


def test_split_of_zero_gives_empty_validation_arrays():
    images = np.zeros((20, 32, 32, 3), np.uint8)
    labels = _labels([2] * 10)
    train_x, train_y, val_x, val_y = split_train_val(images, labels, val_size=0)
    assert len(train_x) == 20 and val_x.shape == (0, 32, 32, 3) and val_y.shape == (0,)


@pytest.mark.parametrize("val_size", [-1, 20, 25, 2.5, True])
def test_split_rejects_bad_sizes(val_size):
    with pytest.raises(DataError):
        split_train_val(np.zeros(20), _labels([2] * 10), val_size=val_size)


def test_split_rejects_mismatched_lengths():
    with pytest.raises(DataError, match="20 images but 10 labels"):
        split_train_val(np.zeros(20), _labels([1] * 10), val_size=1)


# --- statistics and labels -------------------------------------------------------------------


def test_channel_stats_match_a_direct_computation():
    images = np.random.default_rng(0).integers(0, 256, (101, 8, 8, 3), dtype=np.uint8)
    images[..., 2] //= 3  # give the channels different statistics
    mean, std = channel_stats(images, chunk=7)  # chunks that do not divide the count
    pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-12)
    assert isinstance(mean, tuple) and len(std) == 3


def test_channel_stats_of_constant_images():
    images = np.full((4, 32, 32, 3), (255, 0, 51), dtype=np.uint8)
    mean, std = channel_stats(images)
    assert mean == pytest.approx((1.0, 0.0, 0.2)) and std == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("images", [np.zeros((2, 32, 32, 3), np.float32),
                                    np.zeros((2, 32, 32), np.uint8),
                                    np.zeros((0, 32, 32, 3), np.uint8)])
def test_channel_stats_rejects_bad_input(images):
    with pytest.raises(DataError):
        channel_stats(images)


def test_one_hot():
    encoded = one_hot(np.array([0, 3, 9]))
    assert encoded.shape == (3, 10) and encoded.dtype == np.float32
    assert encoded.sum(axis=1).tolist() == [1, 1, 1]
    assert encoded.argmax(axis=1).tolist() == [0, 3, 9]
    assert one_hot(np.array([1]), num_classes=4).tolist() == [[0, 1, 0, 0]]


@pytest.mark.parametrize("labels", [np.array([10]), np.array([-1]), np.array([0.5]),
                                    np.zeros((2, 2), int)])
def test_one_hot_rejects_bad_labels(labels):
    with pytest.raises(DataError):
        one_hot(labels)


def test_official_files_fixture_is_what_it_claims():
    # The generator above is what several tests trust: check it against the documented layout.
    files, expected = official_files(per_batch=3, test_count=2)
    batch = pickle.loads(files["data_batch_1"], encoding="bytes")
    assert batch[b"data"].shape == (3, 3072)
    red_plane = batch[b"data"][0, :1024].reshape(32, 32)
    np.testing.assert_array_equal(red_plane, expected["train_images"][0, :, :, 0])


# --- a damaged or foreign cache is stale -------------------------------------------------------


def rewrite_cache(path, **changes) -> None:
    """Replace arrays of a cache file, keeping the rest."""
    with np.load(path) as stored:
        arrays = {key: stored[key] for key in stored.files}
    arrays.update(changes)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def loads_again_with_a_warning(folder, expected, match: str) -> None:
    with pytest.warns(UserWarning, match=match):
        again = load_cifar10(folder, progress=False)
    assert not again.from_cache
    assert_arrays_equal(again, expected)
    assert load_cifar10(folder, progress=False).from_cache  # rebuilt, and good again


def test_out_of_range_labels_in_the_cache_make_it_stale(tmp_path):
    expected = write_official_folder(tmp_path / "cifar")
    cache = load_cifar10(tmp_path / "cifar", progress=False).cache_file
    labels = expected["train_labels"].copy()
    labels[:5] = 12
    rewrite_cache(cache, train_labels=labels)
    loads_again_with_a_warning(tmp_path / "cifar", expected, "labels from 0 to 12")


def test_another_data_sets_cache_under_this_checksum_is_stale(tmp_path):
    expected = write_official_folder(tmp_path / "cifar")
    other = write_official_folder(tmp_path / "other", seed=1, test_count=31)
    cache = load_cifar10(tmp_path / "cifar", progress=False).cache_file
    other_cache = load_cifar10(tmp_path / "other", progress=False).cache_file
    cache.write_bytes(other_cache.read_bytes())
    assert len(other["test_labels"]) != len(expected["test_labels"])
    loads_again_with_a_warning(tmp_path / "cifar", expected, "decoded from another source")


def test_an_absurd_array_header_is_refused_before_allocating(tmp_path):
    expected = write_official_folder(tmp_path / "cifar")
    cache = load_cifar10(tmp_path / "cifar", progress=False).cache_file
    raw = cache.read_bytes()
    count = len(expected["train_labels"])
    shape = f"({count}, 32, 32, 3)".encode()
    absurd = f"({10**12}, 32, 32, 3)".encode()  # 3 PB of pixels
    start = raw.index(shape)
    end = raw.index(b"\n", start)
    header = raw[start:end].replace(shape, absurd, 1)
    extra = len(absurd) - len(shape)
    assert header.endswith(b" " * extra)  # the header's padding makes room: same length
    cache.write_bytes(raw[:start] + header[:len(header) - extra] + raw[end:])
    loads_again_with_a_warning(tmp_path / "cifar", expected, "over 200,000")


def test_a_deeply_nested_checksum_memo_is_forgotten(tmp_path):
    expected = write_official_folder(tmp_path / "cifar")
    first = load_cifar10(tmp_path / "cifar", progress=False)
    memo = tmp_path / "cache" / "checksums.json"
    memo.write_text("[" * 100_000 + "]" * 100_000)
    again = load_cifar10(tmp_path / "cifar", progress=False)
    assert again.from_cache and again.checksum == first.checksum
    assert_arrays_equal(again, expected)
    # A remembered checksum that could not be one is not used to name a cache file.
    memo.write_text(json.dumps({str((tmp_path / "cifar").resolve()): {
        "fingerprint": "x", "checksum": "../../escape"}}))
    assert load_cifar10(tmp_path / "cifar", progress=False).checksum == first.checksum
