"""predict: the classifier interface, every image mode, bad files, safe checkpoint loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_inception import checkpoint as ckpt_mod
from cifar_inception.cli import main
from cifar_inception.errors import CheckpointError
from cifar_inception.models import create_model
from cifar_inception.predict import (
    Classifier,
    TorchClassifier,
    load_classifier,
    predict_files,
    top_classes,
)
from small_model import CLASSES, SMALL, save_small_checkpoint, small_model


def build_model(num_classes: int = 10, *, real: bool = False):
    """The small stand-in (fast on any CPU), or the real GoogLeNet at a small width."""
    if real:
        torch.manual_seed(0)
        return "googlenet", {"width": 0.25}, create_model("googlenet", num_classes, width=0.25)
    return SMALL, {"hidden": 4}, small_model(num_classes)


def save_model_checkpoint(path, num_classes: int = 10, *, real: bool = False, **overrides):
    fields = dict(mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26],
                  metrics={"epoch": 3, "val_acc": 0.5})
    if real:
        name, options, model = build_model(num_classes, real=True)
        fields.update(model_name=name, model_options=options, state_dict=model.state_dict())
    fields.update(overrides)
    return save_small_checkpoint(path, num_classes, **fields)


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_model_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def classifier(checkpoint_path):
    return load_classifier(checkpoint_path, device="cpu")


def rgb_noise(size, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """One file per mode the command must accept, plus a corrupt one, in nested folders."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    rgb = Image.fromarray(rgb_noise((40, 30)))
    rgb.save(root / "rgb.png")
    rgba = np.dstack([rgb_noise((50, 50), 1), np.full((50, 50), 128, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(root / "rgba.png")
    Image.fromarray(rgb_noise((33, 20), 2)[..., 0], mode="L").save(root / "grey.jpg")
    rgb.quantize(16).save(root / "sub" / "palette.gif")
    sixteen = np.random.default_rng(3).integers(0, 65536, (24, 24), dtype=np.uint16)
    Image.fromarray(sixteen).save(root / "sub" / "sixteen.png")
    Image.fromarray(rgb_noise((1600, 1200), 4)).save(root / "sub" / "large.jpg", quality=70)
    Image.fromarray(rgb_noise((1, 1), 5)).save(root / "tiny.bmp")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a real png")
    (root / "notes.txt").write_text("not an image: not collected from a folder")
    return root


EXPECTED = {"rgb.png", "rgba.png", "grey.jpg", "palette.gif", "sixteen.png", "large.jpg",
            "tiny.bmp", "corrupt.png"}


def test_classifier_interface(classifier, checkpoint_path):
    assert isinstance(classifier, Classifier)
    assert isinstance(classifier, TorchClassifier)
    assert classifier.classes == tuple(CLASSES)
    name, options, model = build_model()
    assert classifier.model_name == name
    assert classifier.info["options"] == options
    assert classifier.info["params"] == sum(p.numel() for p in model.parameters())
    assert classifier.info["metrics"] == {"epoch": 3, "val_acc": 0.5}
    probs = classifier.predict_proba(np.stack([rgb_noise((32, 32), s) for s in range(5)]))
    assert probs.shape == (5, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs >= 0).all()
    # A run folder stands for its best.pt: same predictions.
    again = load_classifier(checkpoint_path.parent, device="cpu")
    np.testing.assert_allclose(again.predict_proba(rgb_noise((32, 32))[None]), probs[:1],
                               rtol=1e-5, atol=1e-6)


def test_real_model_checkpoint(tmp_path, image_folder, capsys):
    """A registered Inception network at a small width, end to end through the command."""
    path = tmp_path / "googlenet.pt"
    save_model_checkpoint(path, real=True)
    status = main(["predict", str(path), str(image_folder / "rgb.png"),
                   str(image_folder / "sub" / "palette.gif"), "--json", "--device", "cpu"])
    doc = json.loads(capsys.readouterr().out)
    assert status == 0
    assert doc["model"]["model"] == "googlenet" and doc["model"]["options"] == {"width": 0.25}
    assert doc["model"]["params"] == sum(p.numel() for p in build_model(real=True)[2].parameters())
    for result in doc["results"]:
        probs = [p["probability"] for p in result["predictions"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6


def test_predictions_match_the_model_with_normalisation(classifier):
    """predict_proba == softmax(model((x/255 - mean) / std)), computed independently."""
    images = np.stack([rgb_noise((32, 32), s) for s in range(3)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(classifier.model((x - mean) / std), dim=1).numpy()
    np.testing.assert_allclose(classifier.predict_proba(images), expected, rtol=1e-4, atol=1e-6)


def test_top_classes_sorted_and_clamped():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    assert top_classes(probs, ["a", "b", "c"], 2) == [[("b", 0.6), ("c", 0.3)],
                                                      [("a", 0.5), ("c", 0.3)]]
    assert len(top_classes(probs, ["a", "b", "c"], 99)[0]) == 3


def test_predict_files_every_mode_and_a_corrupt_file(classifier, image_folder):
    results = predict_files(classifier, [image_folder], top_k=3)
    by_name = {Path(r.path).name: r for r in results}
    assert set(by_name) == EXPECTED
    assert not by_name["corrupt.png"].ok and "corrupt.png" in by_name["corrupt.png"].error
    for name in EXPECTED - {"corrupt.png"}:
        result = by_name[name]
        assert result.ok, result.error
        assert len(result.top) == 3
        assert [p for _, p in result.top] == sorted((p for _, p in result.top), reverse=True)
        assert all(c in CLASSES for c, _ in result.top)


def test_images_converted_like_images_module(classifier, image_folder):
    """Each file is predicted exactly as its images.load_cifar_array array is."""
    from cifar_inception.images import load_cifar_array

    path = image_folder / "sub" / "sixteen.png"
    [result] = predict_files(classifier, [path], top_k=10)
    probs = classifier.predict_proba(load_cifar_array(path)[None])[0]
    assert dict(result.top) == pytest.approx(dict(zip(CLASSES, probs.tolist())))


def test_decompression_bomb_refused(classifier, tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # 81 megapixels in a few kilobytes
    assert bomb.stat().st_size < 100_000
    ok = tmp_path / "ok.png"
    Image.fromarray(rgb_noise((32, 32))).save(ok)
    bad, good = predict_files(classifier, [bomb, ok])
    assert "decompression bomb" in bad.error and "bomb.png" in bad.error
    assert good.ok


def test_cli_text_output_and_exit_code(checkpoint_path, image_folder, capsys):
    status = main(["predict", str(checkpoint_path), str(image_folder), "--top-k", "2",
                   "--device", "cpu"])
    out, err = capsys.readouterr()
    assert status == 1
    assert "corrupt.png" in err and "1 file(s) could not be read" in err
    assert "Traceback" not in err
    assert "corrupt.png" not in out
    for name in EXPECTED - {"corrupt.png"}:
        assert name in out
    # Each image: its path, then two ranked lines with a percentage.
    ranked = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(ranked) == 2 * (len(EXPECTED) - 1)
    assert all(line.strip()[:2] in ("1.", "2.") and "%" in line for line in ranked)


def test_cli_json_says_the_top_k_it_gave(checkpoint_path, image_folder, capsys):
    assert main(["predict", str(checkpoint_path), str(image_folder / "rgb.png"), "--json",
                 "-k", "99999999999999999999", "--device", "cpu"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["top_k"] == len(CLASSES) == len(doc["results"][0]["predictions"])


def test_cli_json_output(checkpoint_path, image_folder, capsys):
    status = main(["predict", str(checkpoint_path), str(image_folder / "rgb.png"),
                   str(image_folder / "corrupt.png"), str(image_folder / "tiny.bmp"),
                   "--json", "-k", "4", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert status == 1
    doc = json.loads(out)
    assert doc["classes"] == CLASSES and doc["top_k"] == 4
    assert doc["model"]["model"] == build_model()[0]
    first, bad, last = doc["results"]
    assert first["path"].endswith("rgb.png") and len(first["predictions"]) == 4
    assert set(first["predictions"][0]) == {"class", "probability"}
    assert "error" in bad and bad["path"].endswith("corrupt.png")
    assert last["path"].endswith("tiny.bmp")
    assert "corrupt.png" in err


def test_cli_all_good_exits_zero(checkpoint_path, image_folder, capsys):
    status = main(["predict", str(checkpoint_path.parent), str(image_folder / "rgb.png"),
                   "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert status == 0 and len(doc["results"]) == 1


def test_cli_json_is_valid_with_nan_and_tensors_in_the_metrics(tmp_path, image_folder,
                                                               capsys):
    metrics = {"val_loss": float("nan"), "nested": {"losses": [float("inf"), 1.0]},
               "val_acc": torch.tensor(0.5), "per_class": torch.zeros(3)}
    save_model_checkpoint(tmp_path / "best.pt", metrics=metrics)
    status = main(["predict", str(tmp_path / "best.pt"), str(image_folder / "rgb.png"),
                   "--json", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert status == 0, err
    doc = json.loads(out, parse_constant=pytest.fail)  # NaN or Infinity is not JSON
    assert doc["model"]["metrics"] == {"val_loss": None, "nested": {"losses": [None, 1.0]},
                                       "val_acc": 0.5, "per_class": [0.0, 0.0, 0.0]}


def test_cli_escapes_control_characters_of_class_names(tmp_path, image_folder, capsys):
    hostile = ["\x1b]0;owned\x07plane", "car\x1b[2J", *CLASSES[2:]]
    save_model_checkpoint(tmp_path / "best.pt", classes=hostile)
    status = main(["predict", str(tmp_path / "best.pt"), str(image_folder / "rgb.png"),
                   "-k", "10", "--device", "cpu"])
    out = capsys.readouterr().out
    assert status == 0
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;owned\\x07plane" in out and "car\\x1b[2J" in out


def test_a_file_name_with_a_newline_cannot_add_a_line_of_its_own(tmp_path, checkpoint_path,
                                                                 capsys):
    # "x.png\n  1. cat 99.99%" as a name would print a forged result line.
    image = tmp_path / "x\n  1. airplane 99.99%.png"
    Image.fromarray(rgb_noise((32, 32))).save(image)
    assert main(["predict", str(checkpoint_path), str(image), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "x\\n  1. airplane 99.99%.png" in out
    assert not any(line.startswith("  1. airplane 99.99%.png") for line in out.splitlines())


def test_cli_prints_any_file_name_whatever_the_terminal_encoding(tmp_path, checkpoint_path,
                                                                 monkeypatch):
    import io
    import sys

    image = tmp_path / "caf\u00e9-\u732b.png"
    Image.fromarray(rgb_noise((32, 32))).save(image)
    ascii_stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")  # PYTHONIOENCODING=ascii
    monkeypatch.setattr(sys, "stdout", ascii_stdout)
    status = main(["predict", str(checkpoint_path), str(image), "--device", "cpu"])
    ascii_stdout.flush()
    assert status == 0
    assert b"caf\\xe9-\\u732b.png" in ascii_stdout.buffer.getvalue()


@pytest.mark.parametrize("target", ["missing-checkpoint", "empty-folder"])
def test_cli_user_errors_exit_two(tmp_path, checkpoint_path, target, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {"missing-checkpoint": [str(tmp_path / "nope.pt"), str(checkpoint_path)],
            "empty-folder": [str(checkpoint_path), str(empty)]}[target]
    assert main(["predict", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cifar-inception: error: ") and err.count("\n") == 1


def test_a_lone_argument_that_is_no_image_says_what_it_is(tmp_path, checkpoint_path, capsys):
    """A model alone lacks its images; a file of an unknown kind is neither image nor model."""
    unknown = tmp_path / "picture.ppm"
    Image.fromarray(rgb_noise((8, 8))).save(unknown)
    assert main(["predict", str(checkpoint_path)]) == 2
    assert "is a model; give the images to classify after it" in capsys.readouterr().err
    assert main(["predict", str(unknown)]) == 2
    err = capsys.readouterr().err
    assert "picture.ppm: not an image of a kind this reads (.png" in err
    assert "nor a model" in err and err.count("\n") == 1


class Exploit:
    """Unpickling this would run code: a weights-only load must refuse it."""

    def __reduce__(self):
        return (print, ("pwned: code ran while loading",))


def test_checkpoint_with_pickled_object_refused(tmp_path, checkpoint_path, capsys):
    evil = tmp_path / "evil.pt"
    ckpt = torch.load(checkpoint_path, weights_only=True)
    ckpt["metrics"] = {"note": Exploit()}
    torch.save(ckpt, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_classifier(evil)
    assert main(["predict", str(evil), str(checkpoint_path)]) == 2
    captured = capsys.readouterr()
    assert "pwned" not in captured.out + captured.err
    assert captured.err.startswith("cifar-inception: error: ")
    assert "evil.pt" in captured.err and "refused" in captured.err


def test_not_a_checkpoint_refused(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a zip file")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_classifier(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(CheckpointError, match="not a cifar-inception checkpoint"):
        load_classifier(plain)


def test_checkpoint_for_other_class_count_refused(tmp_path):
    path = tmp_path / "five.pt"
    ckpt = save_model_checkpoint(path, num_classes=5)
    with pytest.raises(CheckpointError, match="5 classes, not 10"):
        ckpt_mod.check_compatible(ckpt, num_classes=10, where=str(path))
    with pytest.raises(CheckpointError, match="is for model"):
        ckpt_mod.check_compatible(ckpt, model_name="inception-v3")
    # Weights from a 5-class model under a header that claims 10 classes do not load.
    lying = tmp_path / "lying.pt"
    ckpt["model"]["num_classes"] = 10
    ckpt["data"]["classes"] = CLASSES
    ckpt_mod.save_checkpoint(lying, ckpt)
    with pytest.raises(CheckpointError, match="weights do not fit model"):
        load_classifier(lying)


def test_onnx_classifier_when_available(tmp_path, image_folder, capsys):
    export = pytest.importorskip("cifar_inception.export")
    if not hasattr(export, "OnnxClassifier"):
        pytest.skip("export.OnnxClassifier is not available")
    pytest.importorskip("onnxruntime")
    checkpoint_path = tmp_path / "tiny.pt"
    save_model_checkpoint(checkpoint_path)
    onnx_path = tmp_path / "model.onnx"
    export.export_onnx(checkpoint_path, onnx_path)
    onnx_clf = load_classifier(onnx_path)
    assert isinstance(onnx_clf, export.OnnxClassifier) and isinstance(onnx_clf, Classifier)
    torch_clf = load_classifier(checkpoint_path, device="cpu")
    assert tuple(onnx_clf.classes) == torch_clf.classes
    assert onnx_clf.model_name == torch_clf.model_name
    images = np.stack([rgb_noise((32, 32), s) for s in range(4)])
    np.testing.assert_allclose(onnx_clf.predict_proba(images), torch_clf.predict_proba(images),
                               rtol=1e-3, atol=1e-4)
    assert main(["predict", str(onnx_path), str(image_folder), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"]["format"] == "onnx"
    assert sum("error" in r for r in doc["results"]) == 1


def test_bad_onnx_and_device_are_user_errors(tmp_path, checkpoint_path, capsys):
    assert main(["predict", str(tmp_path / "absent.onnx"), str(checkpoint_path)]) == 2
    assert "absent.onnx" in capsys.readouterr().err
    assert main(["predict", str(checkpoint_path), str(checkpoint_path), "--device", "tpu9"]) == 2
    assert "device" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_a_fifo_is_skipped_with_a_message_instead_of_hanging(tmp_path, checkpoint_path, capsys):
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    good = tmp_path / "good.png"
    Image.fromarray(rgb_noise((32, 32))).save(good)
    assert main(["predict", str(checkpoint_path), str(fifo), str(good)]) == 1
    captured = capsys.readouterr()
    assert f"skipped {fifo}: not a regular file (a named pipe (FIFO))" in captured.err
    assert str(good) in captured.out


def test_predict_walks_a_folder_nested_deeper_than_the_recursion_limit(tmp_path, capsys):
    import sys

    # Python's default limit, set here: a library imported by an earlier test may have raised
    # it, and a folder deeper than a raised limit would pass the OS's path length (4,096).
    limit_before = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    folder = tmp_path / "deep"
    nested = [folder]
    for _ in range(sys.getrecursionlimit() + 100):
        nested.append(nested[-1] / "d")
    for path in nested:
        path.mkdir()
    image = nested[-1] / "black.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    loop = folder / "d" / "loop"
    loop.symlink_to(folder, target_is_directory=True)  # not followed: no endless walk
    checkpoint = tmp_path / "model.pt"
    save_small_checkpoint(checkpoint)
    try:
        assert main(["predict", str(checkpoint), str(folder), "--json"]) == 0
        results = json.loads(capsys.readouterr().out)["results"]
        assert [Path(r["path"]).name for r in results] == ["black.png"]
    finally:  # removed here: a recursive removal of the temporary folder would overflow
        image.unlink()
        loop.unlink()
        for path in reversed(nested):
            path.rmdir()
        sys.setrecursionlimit(limit_before)
