"""Datasets other than CIFAR-10, end to end: CIFAR-100 through its official download path,
and a 3-class tree of 48x48 images from training to serving."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_inception import data
from cifar_inception.cli import main
from cifar_inception.data import load_dataset
from cifar_inception.errors import DataError
from synthetic_data import TINY  # noqa: F401 - registers the tiny model

FINE = tuple(f"fine{i:03d}" for i in range(100))
COARSE = tuple(f"coarse{i:02d}" for i in range(20))
TRAIN_ARGS = ["--epochs", "1", "--batch-size", "20", "--val-size", "0", "--threads", "1",
              "--no-cpu-amp"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_INCEPTION_CACHE", str(tmp_path / "cache"))
    for proxy in ("http_proxy", "https_proxy", "all_proxy"):  # talk to 127.0.0.1 directly
        monkeypatch.delenv(proxy, raising=False)
        monkeypatch.delenv(proxy.upper(), raising=False)


# --- CIFAR-100 ------------------------------------------------------------------------------


def cifar100_archive(n_train: int = 200, n_test: int = 100) -> tuple[bytes, dict]:
    """A cifar-100-python.tar.gz of the official layout: train, test and meta pickles."""
    rng = np.random.default_rng(0)
    expected, members = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % len(FINE)
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        expected[split] = (images, fine)
        members[split] = {b"data": images.transpose(0, 3, 1, 2).reshape(n, -1),
                          b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(),
                          b"filenames": [b"x.png"] * n, b"batch_label": split.encode()}
    members["meta"] = {b"fine_label_names": [n.encode() for n in FINE],
                       b"coarse_label_names": [n.encode() for n in COARSE]}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            blob = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buffer.getvalue(), expected


@pytest.fixture()
def cifar100_server(monkeypatch):
    """The generated archive served on 127.0.0.1, with the CIFAR-100 spec expecting its MD5."""
    archive, expected = cifar100_archive()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server name
            self.send_response(200)
            self.send_header("Content-Length", str(len(archive)))
            self.end_headers()
            self.wfile.write(archive)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    md5 = hashlib.md5(archive).hexdigest()
    for name in ("cifar100", "cifar100-coarse"):
        monkeypatch.setitem(data.SPECS, name, replace(data.SPECS[name], md5=md5))
    monkeypatch.setenv(data.SPECS["cifar100"].url_env,
                       f"http://127.0.0.1:{httpd.server_address[1]}/cifar-100-python.tar.gz")
    yield expected
    httpd.shutdown()
    httpd.server_close()


def test_cifar100_downloads_with_fine_and_coarse_labels(tmp_path, cifar100_server):
    folder = tmp_path / "data"
    folder.mkdir()
    fine = load_dataset("cifar100", folder, progress=False)
    assert (folder / "cifar-100-python.tar.gz").is_file()
    assert fine.name == "cifar100" and fine.classes == FINE
    np.testing.assert_array_equal(fine.train_images, cifar100_server["train"][0])
    np.testing.assert_array_equal(fine.test_labels, cifar100_server["test"][1])
    coarse = load_dataset("cifar100-coarse", folder, download=False, progress=False)
    assert coarse.classes == COARSE
    np.testing.assert_array_equal(coarse.train_labels, cifar100_server["train"][1] // 5)
    again = load_dataset("cifar100", folder, download=False, progress=False)
    assert again.from_cache and again.classes == FINE


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_cifar100_train_evaluate_predict_export(tmp_path, cifar100_server, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    runs = tmp_path / "runs"
    assert main(["train", "test-tiny", "--dataset", "cifar100", "--data-dir", str(folder),
                 "--output", str(runs), "--name", "c100", *TRAIN_ARGS]) == 0
    run = runs / "c100"
    evaluation = json.loads((run / "eval.json").read_text())
    assert len(evaluation["per_class"]) == 100 and "test_top5" in evaluation
    capsys.readouterr()

    assert main(["evaluate", str(run), "--no-write"]) == 0  # no --dataset: the run knows it
    table = capsys.readouterr().out
    assert "top-5" in table and "most confused pairs" in table

    image = tmp_path / "one.png"
    Image.fromarray(cifar100_server["test"][0][0]).save(image)
    assert main(["predict", str(run), str(image), "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert json.dumps(predicted).count("fine0") >= 1

    exported = tmp_path / "model.ts"
    assert main(["export", str(run), "--format", "torchscript", "-o", str(exported)]) == 0
    import torch

    from cifar_inception.export import METADATA_FILE

    extra = {METADATA_FILE: ""}
    torch.jit.load(str(exported), _extra_files=extra)
    metadata = json.loads(extra[METADATA_FILE])
    assert tuple(metadata["classes"]) == FINE and metadata["dataset"] == "cifar100"


# --- an image-folder tree of 3 classes ------------------------------------------------------


def write_tree(root: Path, classes=("cat", "cow", "ant"), per_class=(12, 4)) -> None:
    """train/ and test/ folders of 48x48 PNGs, one colour per class."""
    colours = ((200, 30, 30), (30, 200, 30), (30, 30, 200))
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "test"), per_class, strict=True):
        for name, colour in zip(classes, colours, strict=False):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                noise = rng.normal(0, 20, (48, 48, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_any_class_folders_are_a_dataset_of_their_own(tmp_path):
    write_tree(tmp_path / "tree")
    loaded = load_dataset(None, tmp_path / "tree", progress=False)
    assert loaded.name == "image-folder" and loaded.classes == ("ant", "cat", "cow")  # sorted
    assert loaded.train_images.shape == (36, 32, 32, 3)  # resized from 48x48
    assert loaded.train_labels.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    with pytest.raises(DataError, match="lacks the class folder"):
        load_dataset("cifar10", tmp_path / "tree", progress=False)


def test_one_class_folder_is_refused(tmp_path):
    write_tree(tmp_path / "tree", classes=("only",))
    with pytest.raises(DataError, match="a dataset needs 2 or more"):
        load_dataset(None, tmp_path / "tree", progress=False)


def test_three_class_tree_from_train_to_serve(tmp_path, capsys):
    from starlette.testclient import TestClient

    from cifar_inception.inference import load_classifier
    from cifar_inception.serve import create_app

    write_tree(tmp_path / "tree")
    runs = tmp_path / "runs"
    assert main(["train", "test-tiny", "--data-dir", str(tmp_path / "tree"), "--output",
                 str(runs), "--name", "three", *TRAIN_ARGS]) == 0
    run = runs / "three"
    evaluation = json.loads((run / "eval.json").read_text())
    assert list(evaluation["per_class"]) == ["ant", "cat", "cow"]
    assert "test_top5" not in evaluation
    capsys.readouterr()
    assert main(["evaluate", str(run), "--no-write"]) == 0
    table = capsys.readouterr().out
    assert "top-5" not in table and "confusion matrix" in table

    upload = io.BytesIO()
    Image.fromarray(np.full((48, 48, 3), (30, 200, 30), np.uint8)).save(upload, format="PNG")
    with TestClient(create_app(load_classifier(run / "best.pt"))) as client:
        model = client.get("/api/model").json()
        assert model["classes"] == ["ant", "cat", "cow"]
        assert model["dataset"] == "image-folder"
        answer = client.post("/api/predict",
                             files={"file": ("cow.png", upload.getvalue(), "image/png")})
    assert answer.status_code == 200
    top = answer.json()["results"][0]["top"]
    assert len(top) == 3 and {entry["class"] for entry in top} == {"ant", "cat", "cow"}
