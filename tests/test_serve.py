"""serve: the JSON API and its limits (Starlette's TestClient), the page's files, the CLI."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from cifar_inception.cli import main
from cifar_inception.data import CLASSES
from cifar_inception.images import load_cifar_array
from cifar_inception.serve import create_app
from cifar_inception.serve.app import SECURITY_HEADERS
from cifar_inception.serve.server import is_loopback, open_listener, url_of

WEIGHTS = np.random.default_rng(0).normal(size=(3, 10))


class FakeClassifier:
    """Mean colour -> softmax over fixed weights: cheap, deterministic, image-dependent.

    Records each call, and fails the call if it runs on a thread with an event loop (the
    server must run inference in a worker thread).
    """

    classes = CLASSES
    model_name = "fake-net"

    def __init__(self):
        self.info = {"model": "fake-net", "options": {"width": 1}, "num_classes": 10,
                     "params": 1234, "metrics": {"test_top1": 0.75}, "format": "pytorch",
                     "source": ""}
        self.calls: list[int] = []
        self.fail = False

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise AssertionError("inference ran on the event loop")
        if self.fail:
            raise RuntimeError("boom")
        self.calls.append(len(images))
        return expected_probs(images)


def expected_probs(images: np.ndarray) -> np.ndarray:
    logits = images.reshape(len(images), -1, 3).mean(1) / 255.0 @ WEIGHTS * 5
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return exp / exp.sum(1, keepdims=True)


def png_bytes(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, format=fmt)
    return buffer.getvalue()


def picture(width: int = 48, height: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture()
def classifier():
    return FakeClassifier()


@pytest.fixture()
def client(classifier):
    with TestClient(create_app(classifier, max_upload_bytes=200_000, max_files=4)) as c:
        yield c


def post_files(client, files, **kwargs):
    return client.post("/api/predict", files=[("file", f) for f in files], **kwargs)


def assert_error(response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for needle in needles:
        assert needle in message, message


def assert_still_serving(client) -> None:
    ok = post_files(client, [("ok.png", png_bytes(picture()), "image/png")])
    assert ok.status_code == 200 and len(ok.json()["results"]) == 1


# --- the page -------------------------------------------------------------------------------


def test_page_and_its_assets_are_served_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file-input"' in page.text and 'type="file"' in page.text
    assert "/static/app.js" in page.text and "/static/app.css" in page.text
    for key, value in SECURITY_HEADERS.items():
        assert page.headers[key] == value
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "/api/predict" in script.text
    assert ".innerHTML" not in script.text  # file names are shown with textContent only
    style = client.get("/static/app.css")
    assert style.status_code == 200 and "image-rendering: pixelated" in style.text


def test_model_info_survives_nan_metrics(classifier):
    classifier.info["metrics"] = {"train_loss": float("nan"), "val_acc": 0.5}
    with TestClient(create_app(classifier)) as client:
        info = client.get("/api/model").json()
    assert info["metrics"] == {"train_loss": None, "val_acc": 0.5} and info["test_top1"] is None


def test_model_info_survives_tensors_and_nested_nan_in_a_checkpoint(tmp_path):
    import torch

    from cifar_inception.inference import load_classifier
    from small_model import save_small_checkpoint

    metrics = {"val_acc": torch.tensor(0.5), "curve": [float("nan"), 0.4],
               "deep": {"loss": float("inf")}}
    save_small_checkpoint(tmp_path / "best.pt", metrics=metrics)
    (tmp_path / "eval.json").write_text('{"checkpoint": "best.pt", "test_top1": NaN}')
    with TestClient(create_app(load_classifier(tmp_path / "best.pt", device="cpu"))) as client:
        response = client.get("/api/model")
    assert response.status_code == 200, response.text
    assert response.json()["metrics"] == {"val_acc": 0.5, "curve": [None, 0.4],
                                          "deep": {"loss": None}}
    assert response.json()["test_top1"] is None


def test_health_and_model(client):
    assert client.get("/api/health").json() == {"status": "ok", "model": "fake-net"}
    model = client.get("/api/model").json()
    assert model["model"] == "fake-net" and model["parameters"] == 1234
    assert model["classes"] == list(CLASSES) and model["test_top1"] == 0.75
    assert model["limits"]["max_upload_bytes"] == 200_000 and model["limits"]["max_files"] == 4


# --- predictions ----------------------------------------------------------------------------


def test_one_image_gets_its_top5_and_the_exact_model_input(client, classifier):
    upload = png_bytes(picture(64, 48))
    response = post_files(client, [("photo.png", upload, "image/png")])
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["filename"] == "photo.png"

    model_input = load_cifar_array(upload)
    probs = expected_probs(model_input[None])[0]
    assert [e["index"] for e in result["top"]] == list(np.argsort(-probs)[:5])
    assert [e["class"] for e in result["top"]] == [CLASSES[e["index"]] for e in result["top"]]
    np.testing.assert_allclose([e["probability"] for e in result["top"]],
                               np.sort(probs)[::-1][:5], rtol=1e-6)
    np.testing.assert_allclose(result["probabilities"], probs, rtol=1e-6)

    prefix = "data:image/png;base64,"
    assert result["input_png"].startswith(prefix)
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["input_png"][len(prefix):]))))
    np.testing.assert_array_equal(shown, model_input)
    assert classifier.calls == [1]


def test_a_batch_is_predicted_in_one_call_in_upload_order(client, classifier):
    rgba = np.dstack([picture(30, 20, seed=2), np.full((20, 30), 128, np.uint8)])
    files = [("a.png", png_bytes(picture(seed=1)), "image/png"),
             ("b.jpg", png_bytes(picture(seed=3), fmt="JPEG"), "image/jpeg"),
             ("c.png", png_bytes(rgba), "image/png"),
             ("d.gif", png_bytes(picture(seed=4), mode="P", fmt="GIF"), "image/gif")]
    response = post_files(client, files, params={"top": 3})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["a.png", "b.jpg", "c.png", "d.gif"]
    assert all(len(r["top"]) == 3 for r in results)
    assert classifier.calls == [4]
    # Each result belongs to its own file: c.png's probabilities are c.png's.
    np.testing.assert_allclose(results[2]["probabilities"],
                               expected_probs(load_cifar_array(files[2][1])[None])[0], rtol=1e-6)


def test_a_bad_file_fails_the_whole_batch_naming_it(client, classifier):
    files = [("good.png", png_bytes(picture()), "image/png"),
             ("notes.txt", b"just some text, not pixels", "text/plain")]
    assert_error(post_files(client, files), 400, "notes.txt", "not an image")
    assert classifier.calls == []  # nothing of the batch was predicted
    assert_still_serving(client)


@pytest.mark.parametrize("name, content, needle", [
    ("text.png", b"hello, world", "not an image"),
    ("cut.png", png_bytes(picture(200, 200))[:300], "corrupt or truncated"),
    ("empty.png", b"", "empty file"),
])
def test_unreadable_images_get_400_with_a_message(client, name, content, needle):
    assert_error(post_files(client, [(name, content, "image/png")]), 400, name, needle)
    assert_still_serving(client)


def test_decompression_bombs_are_refused_before_decoding(client, classifier):
    bomb = io.BytesIO()
    Image.new("1", (8000, 6000)).save(bomb, format="PNG")  # 48 megapixels in a few kB
    assert len(bomb.getvalue()) < 200_000
    assert_error(post_files(client, [("bomb.png", bomb.getvalue(), "image/png")]), 400,
                 "bomb.png", "decompression bomb")
    assert classifier.calls == []
    assert_still_serving(client)


# --- limits and bad requests ----------------------------------------------------------------


def test_a_body_over_the_limit_gets_413_from_its_content_length(client, classifier):
    big = png_bytes(picture(400, 400))  # ~480 kB of noise: over the 200 kB limit
    assert len(big) > 200_000
    response = post_files(client, [("big.png", big, "image/png")])
    assert_error(response, 413, "upload too large", "195 KB")
    assert classifier.calls == []
    assert_still_serving(client)


def test_a_streamed_body_is_counted_and_cut_at_the_limit(client, classifier):
    """Without a Content-Length (chunked), the bytes are counted as they arrive."""
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(300):
            yield b"\0" * 1024  # 300 kB in all
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post("/api/predict", content=body(),
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert_error(response, 413, "upload too large")
    assert classifier.calls == []
    assert_still_serving(client)


def test_request_shape_errors(client):
    assert_error(client.post("/api/predict", json={"image": "x"}), 415, "multipart/form-data")
    assert_error(client.post("/api/predict", files={"note": (None, "text only")}), 400,
                 "no image file")
    too_many = [("f.png", png_bytes(picture()), "image/png")] * 5
    assert_error(post_files(client, too_many), 400, "Too many files")
    for top in ("0", "11", "five"):
        assert_error(post_files(client, [("a.png", png_bytes(picture()), "image/png")],
                                params={"top": top}), 400, "top must be an integer")
    assert_error(client.get("/api/predict"), 405)
    assert_error(client.get("/api/nothing"), 404)
    assert_still_serving(client)


def test_a_failing_model_gives_500_and_the_server_goes_on(classifier):
    with TestClient(create_app(classifier), raise_server_exceptions=False) as client:
        classifier.fail = True
        assert_error(post_files(client, [("a.png", png_bytes(picture()), "image/png")]), 500,
                     "internal error")
        classifier.fail = False
        assert_still_serving(client)


def test_concurrent_requests_all_succeed(classifier):
    app = create_app(classifier)
    with TestClient(app) as client:
        uploads = [png_bytes(picture(seed=i)) for i in range(8)]
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(
                lambda data: post_files(client, [("x.png", data, "image/png")]), uploads))
    assert [r.status_code for r in responses] == [200] * 8
    for data, response in zip(uploads, responses):
        np.testing.assert_allclose(response.json()["results"][0]["probabilities"],
                                   expected_probs(load_cifar_array(data)[None])[0], rtol=1e-6)


# --- with a real checkpoint -----------------------------------------------------------------


def test_a_real_checkpoint_reports_its_run_test_accuracy(tmp_path):
    import torch

    from cifar_inception import checkpoint as ckpt_mod
    from cifar_inception.inference import load_classifier
    from cifar_inception.models import create_model

    torch.manual_seed(0)
    model = create_model("googlenet", width=0.25)
    run = tmp_path / "run"
    ckpt_mod.save_checkpoint(run / "best.pt", ckpt_mod.make_checkpoint(
        model_name="googlenet", model_options={"width": 0.25}, num_classes=10,
        classes=list(CLASSES), mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26],
        state_dict=model.state_dict(), metrics={"epoch": 2, "val_acc": 0.3}))
    (run / "eval.json").write_text(json.dumps({"test_top1": 0.9012, "checkpoint": "best.pt"}))
    with TestClient(create_app(load_classifier(run, device="cpu"))) as client:
        info = client.get("/api/model").json()
        assert info["model"] == "googlenet" and info["test_top1"] == 0.9012
        assert info["parameters"] == sum(p.numel() for p in model.parameters())
        response = post_files(client, [("a.png", png_bytes(picture()), "image/png")])
    assert response.status_code == 200
    probs = response.json()["results"][0]["probabilities"]
    assert len(probs) == 10 and abs(sum(probs) - 1) < 1e-5


# --- the command line -----------------------------------------------------------------------


def test_open_listener_on_a_free_loopback_port():
    sock = open_listener("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert port > 0 and url_of(sock) == f"http://127.0.0.1:{port}/"
        assert is_loopback(sock)
    finally:
        sock.close()


def test_cli_serve_reports_a_busy_port_and_a_missing_model(tmp_path, capsys):
    from cifar_inception import checkpoint as ckpt_mod
    from cifar_inception.models import create_model

    model = create_model("googlenet", width=0.25)
    path = tmp_path / "best.pt"
    ckpt_mod.save_checkpoint(path, ckpt_mod.make_checkpoint(
        model_name="googlenet", model_options={"width": 0.25}, num_classes=10,
        classes=list(CLASSES), mean=[0.5] * 3, std=[0.25] * 3, state_dict=model.state_dict()))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        assert main(["serve", str(path), "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    finally:
        busy.close()
    assert main(["serve", str(tmp_path / "missing.pt")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing.onnx")]) == 2
    assert "no such ONNX file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", str(path), "--port", "70000"])


def test_the_load_check_runs_and_reports():
    """benchmarks/serve_load.py, tiny: a real server, real requests, a JSON summary."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    done = subprocess.run(
        [sys.executable, str(script), "--width", "0.25", "--requests", "6", "--warmup", "2",
         "--concurrency", "2", "--duration", "60", "--json"],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    (round_,) = report["rounds"]
    assert round_["ok"] == 6 and round_["errors"] == 0
    assert round_["requests_per_s"] > 0 and 0 < round_["p50_ms"] <= round_["p99_ms"]
    assert report["setup"]["model"] == "googlenet" and report["setup"]["options"] == {
        "width": 0.25}


# --- decoding bounds, formats, redirects ----------------------------------------------------


def test_a_request_over_the_pixel_limit_gets_413_before_decoding(classifier, monkeypatch):
    import cifar_inception.serve.app as app_mod

    decoded = []
    real = app_mod.load_cifar_array
    monkeypatch.setattr(app_mod, "load_cifar_array",
                        lambda *a, **k: decoded.append(1) or real(*a, **k))
    app = create_app(classifier, max_upload_bytes=200_000, max_files=4,
                     max_request_pixels=2 * 48 * 40)
    with TestClient(app) as client:
        two = [("a.png", png_bytes(picture()), "image/png")] * 2
        assert post_files(client, two).status_code == 200
        decoded.clear()
        assert_error(post_files(client, two + two[:1]), 413, "5,760 pixels",
                     "limit of 3,840 per request")
        assert decoded == [] and classifier.calls == [2]  # only the first request's batch
        assert client.get("/api/model").json()["limits"]["max_request_pixels"] == 3840


def test_decodes_share_one_pixel_budget():
    import threading

    from cifar_inception.serve.app import PixelBudget

    budget = PixelBudget(100)
    assert budget.acquire(60) == 60
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (budget.acquire(60), got.set()))
    waiter.start()
    assert not got.wait(0.2)  # 60 + 60 > 100: the second decode waits
    budget.release(60)
    assert got.wait(5)
    waiter.join()
    budget.release(60)
    assert budget.acquire(500) == 100  # an image over the budget takes all of it, alone


def test_only_raster_formats_are_decoded(client):
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
           b"0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")
    assert_error(post_files(client, [("drawing.eps", eps, "application/postscript")]), 400,
                 "drawing.eps: not an image file")


def test_redirects_never_echo_the_host_header(client):
    response = client.get("/static", headers={"host": "evil.example"}, follow_redirects=False)
    assert response.status_code == 307 and response.headers["location"] == "/static/"
    response = client.get("/api/health/", headers={"host": "evil.example"},
                          follow_redirects=False)
    assert "evil.example" not in response.headers.get("location", "")


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "ten", "1e308", "257"])
def test_cli_serve_refuses_a_non_finite_upload_limit(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(tmp_path / "model.pt"), f"--max-upload-mb={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--max-upload-mb" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("cifar-inception serve: error: ")


# --- slow and many clients, on a real server --------------------------------------------------


@pytest.fixture()
def live_server(classifier):
    """Start uvicorn with given limits on a free loopback port, in a thread; stopped after."""
    import threading

    from cifar_inception.serve.server import ConnectionLimits, build_server

    started = []

    def start(**limits):
        sock = open_listener("127.0.0.1", 0)
        server = build_server(create_app(classifier), access_log=False, log_level="warning",
                              limits=ConnectionLimits(**limits))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        started.append((server, thread))
        for _ in range(200):
            if server.started:
                break
            thread.join(0.05)
        assert server.started
        return sock.getsockname()[:2]

    yield start
    for server, thread in started:
        server.should_exit = True
        thread.join(10)


def read_until_closed(conn: socket.socket, limit_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection; fails if it never does."""
    conn.settimeout(limit_s)
    received = b""
    while chunk := conn.recv(65536):
        received += chunk
    return received


def test_a_client_that_never_finishes_its_headers_is_cut_off(live_server):
    address = live_server(header_timeout=0.5, body_timeout=0.5)
    with socket.create_connection(address) as slow:
        slow.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert read_until_closed(slow) == b""  # closed, not kept for ever


def test_a_client_that_never_finishes_its_body_is_cut_off(live_server):
    address = live_server(header_timeout=0.5, body_timeout=0.5)
    with socket.create_connection(address) as slow:
        slow.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
        assert b"200 OK" not in read_until_closed(slow)


def test_connections_over_the_cap_are_refused_and_the_server_recovers(live_server):
    address = live_server(header_timeout=30, max_connections=2)
    held = [socket.create_connection(address) for _ in range(2)]
    try:
        for conn in held:  # each is accepted and idle: the server now has two
            conn.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
            conn.settimeout(10)
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        with socket.create_connection(address) as extra:
            answer = read_until_closed(extra)
        assert answer.startswith(b"HTTP/1.1 503") and b"too many connections" in answer
    finally:
        for conn in held:
            conn.close()
    for _ in range(100):  # the held connections are seen closed soon after
        with socket.create_connection(address) as fresh:
            fresh.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if read_until_closed(fresh).startswith(b"HTTP/1.1 200"):
                break
    else:
        pytest.fail("the server never served again after the connections closed")


def test_accept_errors_are_logged_once_as_one_line():
    import errno
    import logging

    from cifar_inception.serve.server import AcceptErrorFilter

    flood = AcceptErrorFilter(seconds=60)
    passed = []
    for _ in range(1000):
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError as exc:
            record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                                       "socket.accept() out of system resource\nsocket: <s>",
                                       (), (type(exc), exc, exc.__traceback__))
        if flood.filter(record):
            passed.append(record)
    assert len(passed) == 1
    assert passed[0].exc_info is None and "\n" not in passed[0].getMessage()
    assert "Too many open files" in passed[0].getMessage()
    other = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "other", (), None)
    assert flood.filter(other)


def test_uploads_over_the_budget_get_503_and_are_released(classifier):
    app = create_app(classifier, upload_budget_bytes=100_000, max_concurrent_uploads=2)
    budget = app.state.uploads_in_flight
    upload = {"file": ("a.png", png_bytes(picture()), "image/png")}
    with TestClient(app) as client:
        with budget.hold(60_000):  # another upload holds most of the bytes
            answer = client.post("/api/predict", files=upload)
            assert answer.status_code == 200  # a small body still fits
            big = {"file": ("big.png", png_bytes(picture()) + b"\0" * 50_000, "image/png")}
            busy = client.post("/api/predict", files=big)
            assert busy.status_code == 503 and "busy" in busy.json()["error"]
            assert busy.headers["retry-after"] == "1"
            with budget.hold(1):  # and another holds the second upload slot
                assert client.post("/api/predict", files=upload).status_code == 503
        assert (budget.used_bytes, budget.uploads) == (0, 0)  # every hold was given back
        assert client.post("/api/predict", files=upload).status_code == 200
        assert client.get("/api/model").json()["limits"]["max_concurrent_uploads"] == 2


def test_the_cli_upload_limit_is_the_servers_upload_budget():
    # serve_cmd cannot import serve.app (the [serve] extra) to read it: the two must agree.
    from cifar_inception.cli.serve_cmd import MAX_UPLOAD_MB
    from cifar_inception.serve.app import UPLOAD_BUDGET_BYTES

    assert MAX_UPLOAD_MB * 2**20 == UPLOAD_BUDGET_BYTES
