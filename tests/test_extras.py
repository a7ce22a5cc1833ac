"""Optional dependencies: a missing extra is named in one line, with the pip command."""

from __future__ import annotations

import sys

import pytest

from cifar_inception.cli import main
from cifar_inception.errors import CifarInceptionError, needs_extra


def hide(monkeypatch, *modules: str) -> None:
    """Make ``import NAME`` fail as it does where the package is not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def assert_names_the_extra(capsys, extra: str, module: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("cifar-inception: error: ") and err.count("\n") == 1, err
    assert f"pip install 'cifar-inception[{extra}]'" in err and repr(module) in err


def test_serve_without_the_serve_extra(tmp_path, monkeypatch, capsys):
    hide(monkeypatch, "uvicorn")
    assert main(["serve", str(tmp_path / "model.pt")]) == 2
    assert_names_the_extra(capsys, "serve", "uvicorn")


def test_onnx_export_without_the_export_extra(tmp_path, monkeypatch, capsys):
    hide(monkeypatch, "onnxscript")
    assert main(["export", str(tmp_path / "model.pt"), "--format", "onnx"]) == 2
    assert_names_the_extra(capsys, "export", "onnxscript")


def test_predict_on_onnx_without_the_export_extra(tmp_path, monkeypatch, capsys):
    hide(monkeypatch, "onnxruntime")
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    assert main(["predict", str(tmp_path / "model.onnx"), str(image)]) == 2
    assert_names_the_extra(capsys, "export", "onnxruntime")


def test_our_own_missing_module_stays_a_bug():
    with pytest.raises(ModuleNotFoundError):
        with needs_extra("serve", "serve"):
            import cifar_inception.no_such_module  # noqa: F401
    with pytest.raises(CifarInceptionError, match=r"\[export\]"):
        with needs_extra("export", "ONNX export"):
            import no_such_package_anywhere  # noqa: F401
