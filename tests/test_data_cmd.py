"""``cifar-inception data``, end to end through ``cifar_inception.cli.main``."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from cifar_inception import data
from cifar_inception.cli import main
from cifar_inception.data import CLASSES
from data_fixtures import image_tree_files, pack, write_official_folder


def run(capsys, *argv):
    code = main(["data", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def table(out: str) -> dict[str, list[int]]:
    """The per-class table: name -> [training, test, train, val]."""
    rows = {}
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] in (*CLASSES, "total") and len(fields) == 5:
            rows[fields[0]] = [int(f.replace(",", "")) for f in fields[1:]]
    return rows


def printed_stats(out: str) -> dict[str, list[float]]:
    rows = {}
    for line in out.splitlines():
        match = re.match(r"(mean|std)\s+(0-255|0-1)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", line)
        if match:
            rows[f"{match[1]} {match[2]}"] = [float(v) for v in match.groups()[2:]]
    return rows


def test_data_reports_source_counts_and_statistics(tmp_path, capsys):
    expected = write_official_folder(tmp_path / "cifar", per_batch=20, test_count=10)
    code, out, err = run(capsys, "--data-dir", tmp_path / "cifar", "--val-size", 20,
                         "--seed", 1)
    assert code == 0, err
    assert f"source    {tmp_path / 'cifar' / 'cifar-10-batches-py'}" in out
    assert re.search(r"checksum  sha256:[0-9a-f]{64}", out)
    assert "decoded, now cached" in out

    rows = table(out)
    assert list(rows) == [*CLASSES, "total"]
    all_train = np.bincount(expected["train_labels"], minlength=10)
    for index, cls in enumerate(CLASSES):
        training, test, train, val = rows[cls]
        assert training == all_train[index]
        assert train + val == all_train[index]
        assert test == np.bincount(expected["test_labels"], minlength=10)[index]
    assert rows["total"] == [100, 10, 80, 20]

    # The statistics are those of the 80 training images left after the split.
    train_x = data.split_train_val(expected["train_images"], expected["train_labels"],
                                   val_size=20, seed=1)[0]
    mean, std = data.channel_stats(train_x)
    stats = printed_stats(out)
    np.testing.assert_allclose(stats["mean 0-255"], np.array(mean) * 255, atol=0.006)
    np.testing.assert_allclose(stats["std 0-255"], np.array(std) * 255, atol=0.006)
    np.testing.assert_allclose(stats["mean 0-1"], mean, atol=6e-5)
    np.testing.assert_allclose(stats["std 0-1"], std, atol=6e-5)
    assert "80 training images" in out

    code, out, _ = run(capsys, "--data-dir", tmp_path / "cifar", "--val-size", 20)
    assert code == 0 and "read from the cache" in out


def test_val_size_zero_keeps_every_training_image(tmp_path, capsys):
    files, _ = image_tree_files(train_per_class=3, test_per_class=1)
    code, out, _ = run(capsys, "--data-dir", pack(files, tmp_path / "t.zip"), "--val-size", 0)
    assert code == 0
    assert table(out)["total"] == [30, 10, 30, 0]
    assert all(table(out)[c] == [3, 1, 3, 0] for c in CLASSES)
    assert "validation: none" in out and "30 training images" in out


def test_image_size_resizes_before_the_statistics(tmp_path, capsys):
    files, _ = image_tree_files(train_per_class=3, test_per_class=1)
    archive = pack(files, tmp_path / "t.zip")
    code, out, _ = run(capsys, "--data-dir", archive, "--val-size", 0)
    assert code == 0 and "images    32 x 32 pixels, 10 classes" in out
    code, resized, _ = run(capsys, "--data-dir", archive, "--val-size", 0, "--image-size", 12)
    assert code == 0 and "images    12 x 12 pixels, 10 classes" in resized
    assert table(resized) == table(out)
    assert printed_stats(resized) != printed_stats(out)  # averaged over other pixels


def test_grid_is_written(tmp_path, capsys):
    files, _ = image_tree_files(train_per_class=12, test_per_class=1)
    grid = tmp_path / "figures" / "grid.png"
    code, out, _ = run(capsys, "--data-dir", pack(files, tmp_path / "t.tar"), "--grid", grid,
                         "--val-size", 10)
    assert code == 0
    assert f"grid      {grid}" in out
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 600


@pytest.mark.parametrize("argv, fragment", [
    (["--data-dir", "{tmp}/missing"], "does not exist"),
    (["--data-dir", "{tmp}/empty", "--no-download"], "downloading is off"),
    (["--data-dir", "{tmp}/broken.tar.gz"], "truncated or corrupt archive"),
    (["--data-dir", "{tmp}/tree.zip", "--val-size", "31"], "leaves no training images"),
    (["--data-dir", "{tmp}/tree.zip", "--val-size", "-3"], "whole number"),
    (["--data-dir", "{tmp}/tree.zip", "--image-size", "4"], "image size"),
    (["--data-dir", "{tmp}/tree.zip", "--val-size", "0", "--grid", "{tmp}/grid.xyz"],
     "cannot write a figure"),
    (["--data-dir", "{tmp}/tree.zip", "--grid", "{tmp}/empty"], "is a folder"),
])
def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys, argv, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b" + bytes(100))
    files, _ = image_tree_files(train_per_class=3, test_per_class=1)
    pack(files, tmp_path / "tree.zip")
    code, out, err = run(capsys, *(a.format(tmp=tmp_path) for a in argv))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cifar-inception: error: ")
    assert fragment in lines[0]
    assert "Traceback" not in err
    if "--grid" in argv:  # refused before the data is loaded and described
        assert out == ""


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--data-dir", "--no-download", "--grid", "--seed", "--val-size",
                   "--image-size"):
        assert option in out


@pytest.mark.slow
def test_data_on_the_jpeg_copy(jpeg_archive, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv(data.ENV_CACHE, raising=False)  # shares the decoded copy with other tests
    code, out, err = run(capsys, "--data-dir", jpeg_archive, "--val-size", 0,
                         "--grid", tmp_path / "grid.png")
    assert code == 0, err
    rows = table(out)
    assert all(rows[c] == [5000, 1000, 5000, 0] for c in CLASSES)
    assert rows["total"] == [50000, 10000, 50000, 0]
    assert "sha256:0bfcb68717a0ecb0d51ed61034906a773d48d424d94b766a46d7d1c55702a4d9" in out
    std = printed_stats(out)["std 0-1"]
    np.testing.assert_allclose(std, [0.2452, 0.2428, 0.2606], atol=2e-4)  # not 0.2023/...
    assert (tmp_path / "grid.png").stat().st_size > 100_000
