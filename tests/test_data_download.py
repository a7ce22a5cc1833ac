"""Downloading the official archive: real HTTP from a local server, MD5 check, safe extraction.

The server on 127.0.0.1 serves a small generated archive in the official format, a body cut
short, wrong bytes, a 404, and archives with members that must not be extracted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sys
import tarfile
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cifar_inception import data
from cifar_inception.data import download, load_cifar10
from cifar_inception.errors import DataError
from data_fixtures import assert_arrays_equal, write_official_archive


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        self.server.requests.append(self.path)
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        body, declared = route
        if body is None:
            self.trickle(declared)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        self.wfile.write(body)  # fewer bytes than declared: the connection then closes
        self.close_connection = True

    def trickle(self, declared):
        """A few bytes at a time, far slower than any download means: for 10 s at most, or
        until the client hangs up."""
        self.send_response(200)
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(200):
                self.wfile.write(bytes(16))
                time.sleep(0.05)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archives")
    good = folder / "good.tar.gz"
    expected = write_official_archive(good, per_batch=6, test_count=4)
    link = tarfile.TarInfo("cifar-10-batches-py/escape")
    link.type, link.linkname = tarfile.SYMTYPE, "../../outside"
    with_link = folder / "link.tar.gz"
    write_official_archive(with_link, extra_members=[link])
    escape = tarfile.TarInfo("../escaped.txt")
    escape.size = 4
    with_escape = folder / "escape.tar.gz"
    write_official_archive(with_escape, extra_members=[escape])
    return {"good": good.read_bytes(), "expected": expected,
            "link": with_link.read_bytes(), "escape": with_escape.read_bytes()}


@pytest.fixture(scope="module")
def server(archives):
    good = archives["good"]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests = []
    httpd.routes = {
        "/good.tar.gz": (good, len(good)),
        "/truncated.tar.gz": (good[: len(good) // 2], len(good)),
        "/wrong.tar.gz": (bytes(reversed(good)), len(good)),
        "/link.tar.gz": (archives["link"], len(archives["link"])),
        "/escape.tar.gz": (archives["escape"], len(archives["escape"])),
        "/huge.tar.gz": (bytes(3 << 20), 3 << 20),
        "/trickle.tar.gz": (None, 1 << 20),
    }
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for proxy in ("http_proxy", "https_proxy", "all_proxy"):  # talk to 127.0.0.1 directly
        monkeypatch.delenv(proxy, raising=False)
        monkeypatch.delenv(proxy.upper(), raising=False)


def serve(monkeypatch, server, name, md5_of=None):
    """Point downloads at ``name`` on the local server, expecting the MD5 of ``md5_of``."""
    monkeypatch.setenv(data.ENV_URL, f"{server.url}/{name}")
    if md5_of is not None:
        spec = replace(data.CIFAR10_SPEC, md5=hashlib.md5(md5_of).hexdigest())
        # where the spec is looked up: by load_cifar10, by name, and by download_cifar10
        monkeypatch.setattr(data, "CIFAR10_SPEC", spec)
        monkeypatch.setitem(data.SPECS, "cifar10", spec)
        monkeypatch.setattr(download, "CIFAR10", spec)
        monkeypatch.setattr(data, "CIFAR10_MD5", spec.md5)  # where it is shown


def user_folder(tmp_path) -> Path:
    """A data folder that already holds a file of the user's, which must survive anything."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    return folder


def download_error(folder) -> str:
    with pytest.raises(DataError) as info:
        load_cifar10(folder, progress=False)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_download_verify_extract_and_load(tmp_path, monkeypatch, server, archives):
    serve(monkeypatch, server, "good.tar.gz", md5_of=archives["good"])
    folder = user_folder(tmp_path)
    loaded = load_cifar10(folder, progress=False)
    assert_arrays_equal(loaded, archives["expected"])
    assert sorted(os.listdir(folder)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz",
                                          "notes.txt"]
    assert (folder / "cifar-10-python.tar.gz").read_bytes() == archives["good"]
    assert sorted(os.listdir(folder / "cifar-10-batches-py")) == sorted(data.BATCH_FILES)
    # Next time the extracted batches are used; nothing is fetched again.
    requests_before = len(server.requests)
    assert_arrays_equal(load_cifar10(folder, download=False, progress=False),
                        archives["expected"])
    assert len(server.requests) == requests_before


def test_download_with_a_progress_bar(tmp_path, monkeypatch, server, archives, capsys):
    serve(monkeypatch, server, "good.tar.gz", md5_of=archives["good"])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar is drawn on a terminal
    data.download_cifar10(tmp_path, progress=True)
    assert "cifar-10-python.tar.gz" in capsys.readouterr().err


def test_download_into_the_default_folder(tmp_path, monkeypatch, server, archives):
    serve(monkeypatch, server, "good.tar.gz", md5_of=archives["good"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    loaded = load_cifar10(progress=False)
    assert_arrays_equal(loaded, archives["expected"])
    assert (tmp_path / "xdg" / "cifar-inception" / "cifar-10-python.tar.gz").is_file()


def test_wrong_bytes_fail_the_md5_check_and_are_removed(tmp_path, monkeypatch, server,
                                                        archives):
    serve(monkeypatch, server, "wrong.tar.gz", md5_of=archives["good"])
    folder = user_folder(tmp_path)
    message = download_error(folder)
    assert "MD5" in message and data.CIFAR10_MD5 in message and "removed" in message
    assert os.listdir(folder) == ["notes.txt"]


def test_official_md5_is_checked(tmp_path, monkeypatch, server):
    serve(monkeypatch, server, "good.tar.gz")  # not the real archive: its MD5 differs
    folder = user_folder(tmp_path)
    assert "c58f30108f718f92721af3b95e74349a" in download_error(folder)
    assert os.listdir(folder) == ["notes.txt"]


def test_truncated_download_is_removed(tmp_path, monkeypatch, server, archives):
    serve(monkeypatch, server, "truncated.tar.gz", md5_of=archives["good"])
    folder = user_folder(tmp_path)
    message = download_error(folder)
    assert "truncated" in message or "MD5" in message
    assert os.listdir(folder) == ["notes.txt"]


def test_a_download_past_its_size_limit_is_stopped_and_removed(tmp_path, monkeypatch, server):
    # The hash is known only at the end: a server streaming without end would fill the disk.
    monkeypatch.setattr(download, "MAX_ARCHIVE_DOWNLOAD_BYTES", 1 << 20)
    serve(monkeypatch, server, "huge.tar.gz")
    folder = user_folder(tmp_path)
    message = download_error(folder)
    assert "passed 1,048,576 bytes" in message and "stopped and removed" in message
    assert os.listdir(folder) == ["notes.txt"]


def test_a_download_that_trickles_is_stopped_as_stalled_and_removed(tmp_path, monkeypatch,
                                                                    server):
    # Each read's own timeout never fires while a few bytes keep coming.
    monkeypatch.setattr(download, "SLOW_DOWNLOAD_S", 1.0)
    serve(monkeypatch, server, "trickle.tar.gz")
    folder = user_folder(tmp_path)
    started = time.monotonic()
    message = download_error(folder)
    assert "stalled (under 1,024 bytes a second for 1 s)" in message
    assert "removed" in message and "--data-dir" in message
    assert time.monotonic() - started < 8
    assert os.listdir(folder) == ["notes.txt"]


def test_ctrl_c_during_a_download_leaves_nothing_behind(tmp_path, monkeypatch, server):
    import _thread

    serve(monkeypatch, server, "trickle.tar.gz")
    folder = user_folder(tmp_path)
    timer = threading.Timer(1.0, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        load_cifar10(folder, progress=False)
    timer.join()
    assert os.listdir(folder) == ["notes.txt"]


def test_missing_file_on_the_server(tmp_path, monkeypatch, server):
    serve(monkeypatch, server, "nothing-here.tar.gz")
    folder = user_folder(tmp_path)
    assert "404" in download_error(folder)
    assert os.listdir(folder) == ["notes.txt"]


def test_unreachable_network_explains_data_dir(tmp_path, monkeypatch):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv(data.ENV_URL, f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    folder = user_folder(tmp_path)
    message = download_error(folder)
    assert "network unreachable" in message and "--data-dir" in message
    assert len(message) < 400
    assert os.listdir(folder) == ["notes.txt"]


def test_no_download_never_contacts_the_server(tmp_path, monkeypatch, server):
    serve(monkeypatch, server, "good.tar.gz")
    before = len(server.requests)
    with pytest.raises(DataError, match="downloading is off"):
        load_cifar10(user_folder(tmp_path), download=False, progress=False)
    assert len(server.requests) == before


@pytest.mark.parametrize("name, refusal", [("link.tar.gz", "refusing the link"),
                                           ("escape.tar.gz", "points outside")])
def test_unsafe_members_are_never_extracted(tmp_path, monkeypatch, server, archives, name,
                                            refusal):
    serve(monkeypatch, server, name, md5_of=archives[name.split(".")[0]])
    folder = user_folder(tmp_path)
    assert refusal in download_error(folder)
    # The verified download stays; nothing was extracted, inside the folder or out of it.
    assert sorted(os.listdir(folder)) == ["cifar-10-python.tar.gz", "notes.txt"]
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "outside").exists()


def test_extraction_refuses_a_device(tmp_path):
    device = tarfile.TarInfo("cifar-10-batches-py/null")
    device.type = tarfile.CHRTYPE
    archive = tmp_path / "a.tar.gz"
    write_official_archive(archive, extra_members=[device])
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="refusing the device"):
        data.extract_official_archive(archive, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []


def test_extraction_of_a_truncated_archive_leaves_nothing(tmp_path):
    archive = tmp_path / "a.tar.gz"
    write_official_archive(archive)
    archive.write_bytes(archive.read_bytes()[:-2000])
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="truncated"):
        data.extract_official_archive(archive, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []


def test_no_progress_bar_flashes_before_a_network_error(tmp_path, monkeypatch, capsys):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv(data.ENV_URL, f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="network unreachable"):
        load_cifar10(user_folder(tmp_path), progress=True)
    assert capsys.readouterr().err == ""  # no "0.00/1.00" bar ahead of the message
