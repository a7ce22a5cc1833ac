"""Trained weights: the weights= API, --weights on every command, hashes, URLs, and the
package's own shipped weights measured again on the test set."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_inception import pretrained
from cifar_inception.checkpoint import load_checkpoint, save_checkpoint
from cifar_inception.cli import main
from cifar_inception.errors import CifarInceptionError
from cifar_inception.models import create_model
from cifar_inception.pretrained import (
    get_weights,
    list_weights,
    model_source,
    sha256_of,
)
from small_model import SMALL, small_checkpoint

SHIPPED = pretrained.WEIGHTS_FOLDER  # the package's own, before any test replaces it


def half(ckpt: dict) -> dict:
    """Weights stored as shipped: floating-point tensors in half precision."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    return {**ckpt, "state_dict": state}


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A weights folder of two entries for the small model (the second the default)."""
    folder = tmp_path / "weights"
    folder.mkdir()
    entries = []
    for name, hidden, default in (("small-h4.cifar10", 4, False), ("small-h6.cifar10", 6, True)):
        save_checkpoint(folder / f"{name}.pt", half(small_checkpoint(hidden=hidden)))
        entries.append({"name": name, "model": SMALL, "options": {"hidden": hidden},
                        "tag": "cifar10", "file": f"{name}.pt",
                        "sha256": sha256_of(folder / f"{name}.pt"), "default": default,
                        "record": {"test_acc": 0.25, "test_acc_tta": 0.5, "epochs": 1,
                                   "data": "synthetic"}})
    (folder / pretrained.MANIFEST).write_text(json.dumps({"weights": entries}))
    monkeypatch.setattr(pretrained, "WEIGHTS_FOLDER", folder)
    return folder


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "cat.png"
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(path)
    return path


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# --- the API


def test_weights_are_found_by_name_by_tag_and_as_default(shipped):
    assert list_weights() == ["small-h4.cifar10", "small-h6.cifar10"]
    assert list_weights("googlenet") == []
    assert get_weights("small-h4.cifar10").options == {"hidden": 4}
    assert get_weights("cifar10", model=SMALL).name == "small-h4.cifar10"  # the first listed
    assert get_weights("cifar10", model=SMALL, options={"hidden": 6}).name == "small-h6.cifar10"
    assert get_weights("default").name == "small-h6.cifar10"
    assert get_weights("default", model=SMALL).name == "small-h4.cifar10"


def test_create_model_loads_the_weights_with_their_options(shipped):
    model = create_model(SMALL, weights="cifar10", hidden=6)
    expected = small_checkpoint(hidden=6)["state_dict"]
    assert not model.training  # ready to predict
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32  # half on disk, float32 in the model
        torch.testing.assert_close(value, expected[key], atol=2e-3, rtol=1e-3)
    assert create_model(SMALL, weights="small-h4.cifar10").head.in_features == 4


def test_weights_that_do_not_fit_are_refused(shipped, tmp_path):
    with pytest.raises(CifarInceptionError, match="no weights 'cifar10' for model 'test-small' "
                                                  "with options {'hidden': 8}"):
        create_model(SMALL, weights="cifar10", hidden=8)
    with pytest.raises(CifarInceptionError, match="is for model 'test-small', not 'googlenet'"):
        create_model("googlenet", weights=str(shipped / "small-h4.cifar10.pt"))
    with pytest.raises(CifarInceptionError, match="has 10 classes, not 3"):
        create_model(SMALL, num_classes=3, weights="cifar10")
    with pytest.raises(CifarInceptionError, match="no weights 'imagenet'.*small-h4.cifar10"):
        create_model(SMALL, weights="imagenet")


def test_a_damaged_shipped_file_is_refused_before_loading(shipped, image, capsys):
    path = shipped / "small-h6.cifar10.pt"
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    with pytest.raises(CifarInceptionError, match="damaged or replaced"):
        create_model(SMALL, weights="small-h6.cifar10")
    assert main(["predict", str(image)]) == 2  # the package's default: small-h6
    assert "small-h6.cifar10" in error_line(capsys)


def test_a_foreign_file_as_weights_gives_one_line(shipped, tmp_path, image, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    assert main(["predict", "--weights", str(text), str(image)]) == 2
    assert "notes.pt" in error_line(capsys)
    assert main(["train", "googlenet", "--weights", str(shipped / "small-h4.cifar10.pt"),
                 "--epochs", "1", "--data-dir", str(tmp_path / "none"), "--no-download"]) == 2
    assert "is for model 'test-small', not 'googlenet'" in error_line(capsys)


def test_model_source_takes_a_path_or_weights_never_both(shipped):
    assert model_source("run", None).is_run
    assert model_source(None, "default").weights.name == "small-h6.cifar10"
    assert "test top-1 25.00%" in model_source(None, None, default=True).describe()
    with pytest.raises(CifarInceptionError, match="not both"):
        model_source("run", "default")
    with pytest.raises(CifarInceptionError, match="--weights NAME"):
        model_source(None, None)


# --- the commands, with no run folder


def test_predict_with_no_model_uses_the_default_weights_and_says_so(shipped, image, capsys):
    assert main(["predict", str(image), "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cifar-inception: using weights small-h6.cifar10: test-small")
    assert str(image) in out and "  2. " in out
    assert main(["predict", "--json", "--weights", "small-h4.cifar10", str(image)]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)  # stdout stays one JSON document
    assert document["model"]["options"] == {"hidden": 4}
    assert "small-h4.cifar10" in captured.err


def test_evaluate_and_export_take_weights_and_write_nothing_into_the_package(
        shipped, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--weights", "small-h4.cifar10"]) == 0
    assert (tmp_path / "small-h4.cifar10.onnx").is_file()
    assert sorted(p.name for p in shipped.iterdir()) == [
        "manifest.json", "small-h4.cifar10.pt", "small-h6.cifar10.pt"]
    capsys.readouterr()
    assert main(["evaluate", "--weights", "nope", "--no-download"]) == 2
    assert "no weights 'nope'" in error_line(capsys)


def test_serve_with_no_model_builds_the_app_for_the_default_weights(shipped, monkeypatch,
                                                                      capsys):
    pytest.importorskip("uvicorn")
    from cifar_inception.serve import server

    served = {}
    monkeypatch.setattr(server, "run_server",
                        lambda app, sock, **kw: served.update(app=app, sock=sock))
    assert main(["serve", "--port", "0"]) == 0
    served["sock"].close()
    assert "using weights small-h6.cifar10" in capsys.readouterr().out
    from starlette.testclient import TestClient

    with TestClient(served["app"]) as client:
        info = client.get("/api/model").json()
    assert info["model"] == SMALL and info["options"] == {"hidden": 6}


# --- weights from a URL, through the data download's code


class _Files(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802 - the http.server API
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


@pytest.fixture
def web(tmp_path, monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "served.pt"
    save_checkpoint(path, half(small_checkpoint(hidden=4)))
    _Files.files = {"/w/small.pt": path.read_bytes()}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", sha256_of(path)
    httpd.shutdown()
    httpd.server_close()


def test_weights_from_a_url_are_downloaded_once_and_checked(web, tmp_path):
    base, digest = web
    model = create_model(SMALL, weights=f"{base}/w/small.pt#sha256={digest}")
    assert model.head.in_features == 4
    cached = list((tmp_path / "cache" / pretrained.WEIGHTS_CACHE).iterdir())
    assert [p.name for p in cached] == [f"{digest[:16]}-small.pt"]
    _Files.files.clear()  # a second use reads the cache, not the server
    assert create_model(SMALL, weights=f"{base}/w/small.pt#sha256={digest}") is not None


def test_url_weights_with_a_wrong_hash_no_hash_or_no_server_fail_in_one_line(web, tmp_path):
    base, digest = web
    wrong = "0" * 64
    with pytest.raises(CifarInceptionError, match="failed the SHA256 check"):
        create_model(SMALL, weights=f"{base}/w/small.pt#sha256={wrong}")
    assert not any((tmp_path / "cache" / pretrained.WEIGHTS_CACHE).glob("*small.pt"))
    with pytest.raises(CifarInceptionError, match="must end in #sha256=HEX"):
        create_model(SMALL, weights=f"{base}/w/small.pt")
    with pytest.raises(CifarInceptionError, match="answered 404"):
        create_model(SMALL, weights=f"{base}/w/gone.pt#sha256={digest}")
    with pytest.raises(CifarInceptionError, match="network unreachable"):
        create_model(SMALL, weights=f"http://127.0.0.1:9/x.pt#sha256={digest}")


# --- the package's own weights


def shipped_entries() -> list[dict]:
    manifest = SHIPPED / pretrained.MANIFEST
    return json.loads(manifest.read_text())["weights"] if manifest.is_file() else []


def test_the_package_ships_small_checked_weights_with_their_record():
    entries = shipped_entries()
    assert entries, "the package ships no weights"
    assert sum(e["default"] for e in entries) == 1
    total = 0
    for entry in entries:
        path = SHIPPED / entry["file"]
        total += path.stat().st_size
        assert sha256_of(path) == entry["sha256"]
        ckpt = load_checkpoint(path)
        assert ckpt["model"] == {"name": entry["model"], "options": entry["options"],
                                 "num_classes": 10}
        record = entry["record"]
        for key in ("recipe", "command", "epochs", "train_seconds", "cpu", "cpu_capability",
                    "torch", "data", "test_acc", "test_acc_tta", "mean", "std", "classes"):
            assert record.get(key) is not None, (entry["name"], key)
        assert record["classes"] == ckpt["data"]["classes"]
    assert total <= 16 << 20


def measured_entries() -> list:
    """The default weights always; every shipped file with CIFAR_INCEPTION_CHECK_ALL_WEIGHTS=1
    (each re-measurement runs the whole test set: minutes for the larger nets, while their
    bytes are already pinned by the SHA-256 checks above)."""
    entries = shipped_entries()
    if os.environ.get("CIFAR_INCEPTION_CHECK_ALL_WEIGHTS") == "1":
        return entries
    return [e for e in entries if e.get("default")] or entries[:1]


@pytest.mark.slow
@pytest.mark.parametrize("entry", measured_entries(), ids=lambda e: e["name"])
def test_shipped_weights_measure_what_their_record_says(entry, jpeg_archive):
    from cifar_inception.data import load_cifar10
    from cifar_inception.evaluation import evaluate

    data = load_cifar10(jpeg_archive, download=False, progress=False)
    result = evaluate(pretrained.weights_path(entry["name"]), data, write=False)
    assert abs(result["test_top1"] - entry["record"]["test_acc"]) <= 0.0005


# --- the tool that makes them


def test_ship_weights_writes_a_checked_half_precision_entry(tmp_path):
    import ship_weights
    from synthetic_data import TINY, easy_data, write_image_tree

    from cifar_inception.recipes import build_config
    from cifar_inception.training import train

    tree = tmp_path / "tree"
    write_image_tree(easy_data(n_train=200, n_test=40), tree)
    config = build_config(TINY, "default", epochs=3, batch_size=32, lr=0.1, val_size=40,
                          data_dir=str(tree), out_dir=str(tmp_path / "runs"), name="run",
                          num_threads=1, test=False)
    run = train(config, log=lambda line: None).run_dir
    out = tmp_path / "weights"
    assert ship_weights.main([str(run), "--name", "tiny.synthetic", "--tag", "synthetic",
                              "--default", "--data-dir", str(tree), "--data-label",
                              "generated", "--out", str(out), "--threads", "1"]) == 0
    entry = json.loads((out / pretrained.MANIFEST).read_text())["weights"][0]
    assert entry["sha256"] == sha256_of(out / "tiny.synthetic.pt")
    record = entry["record"]
    assert record["precision"] == "float16"  # this easy task loses nothing in half precision
    assert record["epochs"] == 3 and record["data"] == "generated" and record["threads"] == 1
    assert record["command"].startswith("cifar-inception ")
    shipped = load_checkpoint(out / "tiny.synthetic.pt")
    assert "training" not in shipped  # no optimiser state
    assert shipped["metrics"]["test_top1"] == record["test_acc"] > 0.25  # chance: 0.1
    assert all(v.dtype == torch.float16 for v in shipped["state_dict"].values()
               if v.is_floating_point())


def test_ship_weights_shows_the_command_without_the_machines_folders():
    import ship_weights

    argv = ["/opt/env/bin/cifar-inception", "train", "--data-dir", "/srv/data/cifar.tar.gz",
            "--output=/home/me/runs", "--set", "lr=0.1", "--name", "my run"]
    assert ship_weights.shown_command(argv) == (
        "cifar-inception train --data-dir cifar.tar.gz --output=runs --set lr=0.1 "
        "--name 'my run'")
