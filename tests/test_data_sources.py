"""cifar_inception.data: image-folder trees as a folder, .zip, .tar or .tar.gz, and bad ones."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from cifar_inception import data
from cifar_inception.data import CLASSES, archives, load_cifar10, sources, trees
from cifar_inception.errors import DataError
from data_fixtures import (
    assert_arrays_equal,
    encode_image,
    image_tree_files,
    pack,
    random_images,
    write_official_folder,
    write_tree,
)

CONTAINERS = ["folder", "zip", "tar", "tar.gz"]


def make_source(tmp_path, files, container):
    """The same tree as a folder or an archive; returns what to pass as data_dir."""
    folder = tmp_path / "sources"
    folder.mkdir(exist_ok=True)
    if container == "folder":
        return write_tree(folder / "tree", files)
    return pack(files, folder / f"tree.{container}")


def load_error(source) -> str:
    with pytest.raises(DataError) as info:
        load_cifar10(source, download=False, progress=False)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("top", [None, "cifar10"])
def test_image_tree_loads_in_official_class_order(tmp_path, container, top):
    files, expected = image_tree_files(train_per_class=11, test_per_class=2, top=top)
    source = make_source(tmp_path, files, container)
    before = sorted(os.listdir(source.parent))
    loaded = load_cifar10(source, download=False, progress=False)
    assert_arrays_equal(loaded, expected)  # labels by class, images by number (9 before 10)
    assert loaded.classes == CLASSES
    assert "image folders" in loaded.source
    assert sorted(os.listdir(source.parent)) == before  # read in place: nothing unpacked
    assert load_cifar10(source, progress=False).from_cache


@pytest.mark.parametrize("suffix", ["tar.bz2", "tar.xz", "tgz"])
def test_other_tar_compressions(tmp_path, suffix):
    files, expected = image_tree_files()
    assert_arrays_equal(load_cifar10(pack(files, tmp_path / f"t.{suffix}"), progress=False),
                        expected)


def test_folder_holding_a_tree_in_one_subfolder(tmp_path):
    files, expected = image_tree_files(top="cifar10")
    write_tree(tmp_path / "data", files)
    assert_arrays_equal(load_cifar10(tmp_path / "data", progress=False), expected)


def test_folder_with_several_trees_is_refused(tmp_path):
    files, _ = image_tree_files()
    write_tree(tmp_path / "data" / "copy-a", files)
    write_tree(tmp_path / "data" / "copy-b", files)
    assert "several image-folder trees (copy-a, copy-b)" in load_error(tmp_path / "data")


def test_hidden_files_and_macos_forks_are_ignored(tmp_path):
    files, expected = image_tree_files()
    files["train/cat/.DS_Store"] = b"junk"
    files["__MACOSX/train/cat/._0.png"] = b"junk"
    files["README.txt"] = b"about this copy"
    files["train/labels.csv"] = b"a file beside the class folders"
    assert_arrays_equal(load_cifar10(pack(files, tmp_path / "t.zip"), progress=False), expected)


@pytest.mark.parametrize("container", ["folder", "zip", "tar.gz"])
def test_missing_extra_and_misspelt_classes_are_named(tmp_path, container):
    files, _ = image_tree_files()
    renamed = {}
    for name, content in files.items():
        name = name.replace("train/airplane/", "train/airplan/")
        name = name.replace("test/ship/", "test/Ship/")
        renamed[name] = content
    del renamed["train/truck/0.png"], renamed["train/truck/1.png"]
    renamed["train/unicorn/0.png"] = files["train/cat/0.png"]
    message = load_error(make_source(tmp_path, renamed, container))
    assert "train/ lacks the class folder(s) airplane, truck" in message
    assert "'airplan' (did you mean 'airplane'?)" in message
    assert "'unicorn'" in message
    assert "test/ lacks the class folder(s) ship" in message
    assert "'Ship' (did you mean 'ship'?)" in message


def test_missing_split_is_named(tmp_path):
    files, _ = image_tree_files()
    train_only = {k: v for k, v in files.items() if k.startswith("train/")}
    assert "no test/" in load_error(pack(train_only, tmp_path / "t.tar"))
    assert "no test/ folder" in load_error(write_tree(tmp_path / "dir", train_only))


def test_archive_without_cifar_is_reported(tmp_path):
    message = load_error(pack({"photos/a.png": b"x"}, tmp_path / "other.zip"))
    assert "no CIFAR-10 found" in message


def test_trees_in_two_places_are_refused(tmp_path):
    files, _ = image_tree_files()
    both = {f"a/{k}": v for k, v in files.items()} | {f"b/{k}": v for k, v in files.items()}
    assert "several places" in load_error(pack(both, tmp_path / "t.zip"))


@pytest.mark.parametrize("container", CONTAINERS)
def test_image_of_the_wrong_size_is_named(tmp_path, container):
    files, _ = image_tree_files()
    files["train/dog/1.png"] = encode_image(np.zeros((32, 33, 3), np.uint8))
    message = load_error(make_source(tmp_path, files, container))
    assert "train/dog/1.png is 33x32 pixels" in message


@pytest.mark.parametrize("container", CONTAINERS)
def test_corrupt_image_is_named(tmp_path, container):
    files, _ = image_tree_files()
    files["test/frog/0.png"] = files["test/frog/0.png"][:60]
    files["test/deer/0.png"] = b"this is not an image"
    message = load_error(make_source(tmp_path, files, container))
    assert "test/deer/0.png" in message or "test/frog/0.png" in message


def test_non_image_file_in_a_class_folder_is_named(tmp_path):
    files, _ = image_tree_files()
    files["train/horse/notes.txt"] = b"hello"
    assert "train/horse/notes.txt is not an image file" in load_error(
        pack(files, tmp_path / "t.tar.gz"))


def test_modes_are_converted_to_rgb(tmp_path):
    files, expected = image_tree_files(train_per_class=1, test_per_class=1)
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    rgba = np.dstack([random_images(1, 9)[0], np.full((32, 32), 255, np.uint8)])
    rgba[:4, :4, 3] = 0  # fully transparent corner: shown on white
    palette = Image.fromarray(random_images(1, 11)[0]).quantize(colors=16)
    grey16 = rng.integers(0, 65536, (32, 32), dtype=np.uint16)

    def png(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    files["train/airplane/0.png"] = png(Image.fromarray(grey))
    files["train/automobile/0.png"] = png(Image.fromarray(rgba))
    files["train/bird/0.png"] = png(palette)
    files["train/cat/0.png"] = png(Image.fromarray(grey16))
    loaded = load_cifar10(pack(files, tmp_path / "t.zip"), progress=False)

    assert loaded.train_images.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(loaded.train_images[0], np.dstack([grey] * 3))
    want = rgba[..., :3].copy()
    want[:4, :4] = 255
    np.testing.assert_array_equal(loaded.train_images[1], want)
    np.testing.assert_array_equal(loaded.train_images[2], np.asarray(palette.convert("RGB")))
    scaled = np.clip(grey16 / 65535 * 255 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(loaded.train_images[3], np.dstack([scaled] * 3))
    np.testing.assert_array_equal(loaded.train_images[4:], expected["train_images"][4:])


def test_jpeg_images_decode_as_pillow_does(tmp_path):
    files, _ = image_tree_files(train_per_class=1, test_per_class=1)
    jpeg = encode_image(random_images(1, 3)[0], fmt="JPEG")
    files["train/ship/0.jpg"] = jpeg
    del files["train/ship/0.png"]
    loaded = load_cifar10(write_tree(tmp_path / "t", files), progress=False)
    with Image.open(io.BytesIO(jpeg)) as image:
        np.testing.assert_array_equal(loaded.train_images[8], np.asarray(image.convert("RGB")))


# --- broken and unsafe archives --------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["tar", "tar.gz"])
def test_truncated_tar_is_reported(tmp_path, suffix):
    files, _ = image_tree_files()
    archive = pack(files, tmp_path / f"t.{suffix}")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size * 2 // 3])
    assert "truncated" in load_error(archive)


def _member_offsets(archive):
    with tarfile.open(archive) as tar:
        return [member.offset for member in tar.getmembers()]


def test_tar_cut_between_members_is_reported(tmp_path):
    # tarfile alone takes a tar that stops at a member boundary for a complete one.
    files, _ = image_tree_files()
    archive = pack(files, tmp_path / "t.tar")
    cut = _member_offsets(archive)[-3]
    archive.write_bytes(archive.read_bytes()[:cut])
    assert "truncated" in load_error(archive)


def test_tar_with_garbage_for_a_header_is_reported(tmp_path):
    files, _ = image_tree_files()
    archive = pack(files, tmp_path / "t.tar")
    offset = _member_offsets(archive)[-5]
    raw = bytearray(archive.read_bytes())
    raw[offset:offset + 512] = np.random.default_rng(1).bytes(512)
    archive.write_bytes(bytes(raw))
    assert "corrupt" in load_error(archive)


def test_gzip_cut_after_the_tar_end_is_reported(tmp_path):
    files, _ = image_tree_files()
    archive = pack(files, tmp_path / "t.tar.gz")
    archive.write_bytes(archive.read_bytes()[:-4])  # only the gzip trailer's length is lost
    assert "truncated" in load_error(archive)


@pytest.mark.parametrize("suffix", ["tar", "tar.gz", "zip"])
def test_garbage_archive_is_reported(tmp_path, suffix):
    archive = tmp_path / f"t.{suffix}"
    archive.write_bytes(np.random.default_rng(0).bytes(5000))
    message = load_error(archive)
    assert "corrupt" in message or "not a zip file" in message


def test_truncated_zip_is_reported(tmp_path):
    files, _ = image_tree_files()
    archive = pack(files, tmp_path / "t.zip")
    archive.write_bytes(archive.read_bytes()[:-100])
    assert "not a zip file, or a truncated one" in load_error(archive)


def test_zip_with_a_damaged_member_is_reported(tmp_path):
    files, _ = image_tree_files()
    archive = pack(files, tmp_path / "t.zip")
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo("train/bird/1.png")
    raw = bytearray(archive.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + 10
    raw[start:start + 20] = bytes(20)  # zero part of the compressed data
    archive.write_bytes(bytes(raw))
    assert "train/bird/1.png" in load_error(archive)


def _tar_with(tmp_path, member: tarfile.TarInfo, data: bytes | None = None):
    files, _ = image_tree_files()
    archive = pack(files, tmp_path / "t.tar")
    with tarfile.open(archive, "a") as tar:
        tar.addfile(member, io.BytesIO(data) if data is not None else None)
    return archive


def test_tar_with_a_link_is_refused(tmp_path):
    link = tarfile.TarInfo("train/cat/2.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    assert "refusing the link 'train/cat/2.png'" in load_error(_tar_with(tmp_path, link))


def test_tar_with_a_device_is_refused(tmp_path):
    device = tarfile.TarInfo("train/cat/3.png")
    device.type = tarfile.CHRTYPE
    assert "refusing the device" in load_error(_tar_with(tmp_path, device))


def test_member_escaping_the_archive_is_refused(tmp_path):
    escape = tarfile.TarInfo("../train/cat/9.png")
    escape.size = 3
    assert "points outside" in load_error(_tar_with(tmp_path, escape, b"abc"))
    files, _ = image_tree_files()
    files["/abs/train/cat/9.png"] = b"abc"
    assert "points outside" in load_error(pack(files, tmp_path / "t.zip"))


def test_zip_with_a_symlink_is_refused(tmp_path):
    files, _ = image_tree_files()
    archive = pack(files, tmp_path / "t.zip")
    with zipfile.ZipFile(archive, "a") as z:
        info = zipfile.ZipInfo("train/cat/7.png")
        info.external_attr = (0o120777 << 16)  # a symlink, as Info-ZIP stores one
        z.writestr(info, "/etc/passwd")
    assert "refusing the link" in load_error(archive)


# --- decoding in worker processes ------------------------------------------------------------


def test_decoding_in_worker_processes_keeps_order(tmp_path, monkeypatch):
    monkeypatch.setattr(trees, "_DECODE_CHUNK", 7)
    monkeypatch.setattr(trees, "_worker_count", lambda: 2)
    started = []
    original = trees.ImageDecoder._start_pool_if_useful

    def spy(self, first_chunk):
        original(self, first_chunk)
        started.append(self.executor is not None)

    monkeypatch.setattr(trees.ImageDecoder, "_start_pool_if_useful", spy)
    files, expected = image_tree_files(train_per_class=6, test_per_class=3)
    loaded = load_cifar10(pack(files, tmp_path / "t.tar.gz"), progress=False)
    assert started == [True]
    assert_arrays_equal(loaded, expected)


def test_worker_error_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(trees, "_DECODE_CHUNK", 5)
    monkeypatch.setattr(trees, "_worker_count", lambda: 2)
    files, _ = image_tree_files(train_per_class=4, test_per_class=2)
    files["train/truck/2.png"] = b"\x89PNG\r\n\x1a\n broken"
    assert "train/truck/2.png" in load_error(pack(files, tmp_path / "t.zip"))


# --- the real JPEG copy ----------------------------------------------------------------------


@pytest.mark.slow
def test_jpeg_copy_has_the_full_data_set(jpeg_archive, monkeypatch):
    # The default cache: the first run decodes 60,000 images, later runs read the cache.
    monkeypatch.delenv(data.ENV_CACHE, raising=False)
    loaded = load_cifar10(jpeg_archive, download=False, progress=False)
    assert loaded.train_images.shape == (50000, 32, 32, 3)
    assert loaded.test_images.shape == (10000, 32, 32, 3)
    assert np.bincount(loaded.train_labels).tolist() == [5000] * 10
    assert np.bincount(loaded.test_labels).tolist() == [1000] * 10
    mean, std = data.channel_stats(loaded.train_images)
    # The JPEG copy's README gives 125.27/122.93/113.86 and 62.53/61.91/66.46 (0-255).
    np.testing.assert_allclose(np.array(mean) * 255, [125.27, 122.93, 113.86], atol=0.01)
    np.testing.assert_allclose(np.array(std) * 255, [62.53, 61.91, 66.46], atol=0.01)


def _zip_with_a_lying_member(path, name: str, claimed: int, actual: int):
    """A zip whose member's headers claim ``claimed`` bytes but that inflates to ``actual``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, bytes(actual))
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    # the uncompressed size: at offset 22 of the local header, 24 of the central one
    for offset in (info.header_offset + 22, raw.rfind(b"PK\x01\x02") + 24):
        raw[offset:offset + 4] = claimed.to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    return path


def test_a_zip_member_inflating_past_its_header_is_cut_at_the_cap(tmp_path, monkeypatch):
    import tracemalloc

    archive = _zip_with_a_lying_member(tmp_path / "bomb.zip", "train/cat/1.png",
                                       claimed=1000, actual=64 << 20)
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", 1 << 20)
    tracemalloc.start()
    try:
        message = load_error(archive)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "train/cat/1.png" in message
    assert peak < 16 << 20  # nothing near the 64 MiB the member inflates to


def test_read_capped_stops_past_the_limit_whatever_the_size_claimed():
    with pytest.raises(DataError, match="x.png: more than 1,000 bytes"):
        data.read_capped(io.BytesIO(bytes(5000)), 1000, "x.png")
    assert data.read_capped(io.BytesIO(bytes(1000)), 1000, "x.png") == bytes(1000)


def test_a_tar_member_is_read_through_the_same_cap(tmp_path):
    member = tarfile.TarInfo("train/cat/1.png")
    member.size = 5000
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        tar.addfile(member, io.BytesIO(bytes(5000)))
    with tarfile.open(path) as tar:
        with pytest.raises(DataError, match="1.png: more than 1,000 bytes"):
            archives._read_tar_member(tar, tar.getmember("train/cat/1.png"), "t.tar: 1.png", 1000)


def test_an_unreadable_data_folder_is_named(tmp_path, monkeypatch):
    folder = tmp_path / "locked"
    folder.mkdir()
    real_exists = type(folder).exists

    def exists(self):
        if self.parent == folder:  # as stat() inside a folder without search permission
            raise PermissionError(13, "Permission denied", str(self))
        return real_exists(self)

    monkeypatch.setattr(type(folder), "exists", exists)
    message = load_error(folder)
    assert "permission denied" in message and str(folder) in message


def test_an_unreadable_cache_folder_is_only_a_slower_load(tmp_path, monkeypatch):
    files, _ = image_tree_files()
    source = make_source(tmp_path, files, "zip")
    cache = tmp_path / "cache"
    real_is_file = type(cache).is_file

    def is_file(self):
        if cache in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(type(cache), "is_file", is_file)
    loaded = load_cifar10(source, download=False, progress=False)
    assert len(loaded.train_labels) and not loaded.from_cache


def test_a_file_name_that_is_not_utf8_is_checksummed(tmp_path):
    files, expected = image_tree_files(train_per_class=1, test_per_class=1)
    tree = write_tree(tmp_path / "tree", files)
    # A Latin-1 name: valid on disk, not valid UTF-8.
    odd = os.path.join(os.fsencode(tree / "train" / "cat"), b"caf\xe9.png")
    with open(odd, "wb") as handle:
        handle.write(files["train/cat/0.png"])
    loaded = load_cifar10(tree, download=False, progress=False)
    assert len(loaded.train_labels) == len(expected["train_labels"]) + 1
    assert loaded.checksum.startswith("sha256:")
    assert load_cifar10(tree, download=False, progress=False).from_cache


def test_an_archive_of_padded_images_is_capped_in_total(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_SOURCE_BYTES", 200_000)
    files, _ = image_tree_files(train_per_class=1, test_per_class=1)
    padded = {name: blob + b"\0" * 20_000 for name, blob in files.items()}  # valid PNGs
    message = load_error(pack(padded, tmp_path / "padded.zip"))
    assert "its files total more than 200,000 bytes" in message


@pytest.mark.parametrize("container", ["tar", "zip"])
def test_an_archive_holding_a_member_twice_is_refused(tmp_path, container):
    files, _ = image_tree_files(train_per_class=1, test_per_class=1)
    archive = pack(files, tmp_path / f"tree.{container}")
    name, blob = "train/cat/0.png", files["train/cat/0.png"]
    if container == "tar":
        with tarfile.open(archive, "a") as tar:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    else:
        with pytest.warns(UserWarning, match="Duplicate name"), \
                zipfile.ZipFile(archive, "a") as out:
            out.writestr(name, blob)
    assert "holds 'train/cat/0.png' twice" in load_error(archive)


@pytest.mark.parametrize("container", ["tar", "zip"])
def test_an_archive_of_too_many_members_is_refused(tmp_path, monkeypatch, container):
    # tarfile keeps every header it reads: 400,000 empty folder headers gzip to under 1 MB.
    monkeypatch.setattr(archives, "MAX_ARCHIVE_MEMBERS", 15)
    files, _ = image_tree_files(train_per_class=1, test_per_class=1)  # 20 files
    message = load_error(pack(files, tmp_path / f"tree.{container}"))
    assert "holds more than 15 members" in message


def test_images_that_would_decode_past_the_limit_are_refused_before_decoding(tmp_path,
                                                                              monkeypatch):
    # Read bytes do not bound the decoded size: a 69-byte PNG is 48 KB at 128 pixels.
    from cifar_inception.data import common

    monkeypatch.setattr(common, "MAX_DECODED_BYTES", 20 * 32 * 32 * 3)
    decoded = []
    monkeypatch.setattr(trees, "_decode_image",
                        lambda blob, name, spec: decoded.append(name) or np.zeros((32, 32, 3)))
    files, _ = image_tree_files(train_per_class=2, test_per_class=1)  # 30 images
    message = load_error(make_source(tmp_path, files, "folder"))
    assert "21 images of 32x32 pixels would take" in message
    assert "smaller --image-size" in message
    assert len(decoded) <= 20  # refused when the 21st arrives, not after decoding them all


def test_the_official_batches_at_a_size_past_the_limit_are_refused_before_resizing(
        tmp_path, monkeypatch):
    from cifar_inception.data import common

    folder = tmp_path / "official"
    write_official_folder(folder, per_batch=4, test_count=4)  # 24 images
    monkeypatch.setattr(common, "MAX_DECODED_BYTES", 24 * 64 * 64 * 3 - 1)
    with pytest.raises(DataError, match="24 images of 64x64 pixels would take"):
        data.load_dataset("cifar10", folder, image_size=64, download=False, progress=False)
    monkeypatch.setattr(common, "MAX_DECODED_BYTES", 24 * 64 * 64 * 3)
    loaded = data.load_dataset("cifar10", folder, image_size=64, download=False, progress=False)
    assert loaded.train_images.shape[1:] == (64, 64, 3)


def test_a_tree_of_more_classes_than_a_model_may_have_is_refused(tmp_path, monkeypatch):
    # Trained, its checkpoint could never be loaded again (checkpoints allow MAX_CLASSES).
    monkeypatch.setattr(trees, "MAX_CLASSES", 3)
    files = {f"{split}/class{c}/0.png": encode_image(random_images(1, c)[0])
             for split in ("train", "test") for c in range(4)}
    with pytest.raises(DataError, match="train/ has 4 class folders; a dataset may have at "
                                        "most 3"):
        data.load_dataset("image-folder", make_source(tmp_path, files, "folder"), download=False,
                          progress=False)


def test_a_tar_unpacking_past_the_limit_is_refused_before_it_is_unpacked(tmp_path,
                                                                         monkeypatch):
    # A member outside the tree is skipped, but skipping it in a compressed tar decompresses
    # it: 100 GB of zeros compress to some 100 MB. Its size is in its header.
    files, expected = image_tree_files(train_per_class=1, test_per_class=1)
    archive = pack({**files, "extra/zeros.bin": bytes(200_000)}, tmp_path / "tree.tar.gz")
    monkeypatch.setattr(archives, "MAX_UNPACKED_BYTES", 150_000)
    assert "unpacks to more than" in load_error(archive)
    monkeypatch.setattr(archives, "MAX_UNPACKED_BYTES", 400_000)
    assert_arrays_equal(load_cifar10(archive, download=False, progress=False), expected)


def test_a_class_folder_name_with_a_newline_is_refused(tmp_path):
    # The cache and every message keep class names one per line.
    files = {f"{split}/{name}/0.png": encode_image(random_images(1, index)[0])
             for split in ("train", "test") for index, name in enumerate(("a\nb", "c"))}
    with pytest.raises(DataError, match="class folder names with control characters") as info:
        data.load_dataset("image-folder", make_source(tmp_path, files, "folder"),
                          download=False, progress=False)
    assert "\n" not in str(info.value)
