"""Atomic writes: the destination holds the old content or the new, never half of either."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from cifar_inception.errors import CifarInceptionError
from cifar_inception.fileio import (MAX_JSON_DEPTH, append_jsonl, atomic_open,
                                    atomic_write_bytes, atomic_write_json, atomic_write_text,
                                    parse_json, read_jsonl, to_json)


def test_atomic_write_replaces_content_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as handle:
            handle.write("half of the new")
            raise RuntimeError("crash in the middle")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_written_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "shared.html", "<p>report</p>")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.html").stat().st_mode & 0o777 == 0o644


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    private = tmp_path / "eval.json"
    private.write_text("{}")
    private.chmod(0o600)  # the user made it private: a rewrite must not publish it
    atomic_write_text(private, '{"test_top1": 0.9}')
    assert private.stat().st_mode & 0o777 == 0o600 and "0.9" in private.read_text()


def test_read_jsonl_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"epoch": 1})
    append_jsonl(path, {"epoch": 2})
    with open(path, "a") as handle:
        handle.write('{"epoch": 3, "val_')  # a crash mid-line
    assert read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]


# A device node, a FIFO or a folder at the output path is refused, never renamed over.
@pytest.mark.parametrize("kind", ["fifo", "link to a fifo", "folder"])
def test_atomic_write_refuses_to_replace_what_is_not_a_regular_file(tmp_path, kind):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = {"fifo": fifo, "link to a fifo": tmp_path / "link", "folder": tmp_path / "dir"}[kind]
    if kind == "link to a fifo":
        target.symlink_to(fifo)
    elif kind == "folder":
        target.mkdir()
    with pytest.raises(CifarInceptionError, match="not a regular file"):
        atomic_write_bytes(target, b"model")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"fifo", target.name})


def test_json_written_is_valid_json_whatever_it_holds(tmp_path):
    value = {"nan": float("nan"), "nested": [{"inf": float("-inf")}], "tensor": torch.tensor(0.5),
             "vector": torch.tensor([1, 2]), "array": np.float32(0.25), "tuple": (1, 2)}
    expected = {"nan": None, "nested": [{"inf": None}], "tensor": 0.5, "vector": [1, 2],
                "array": 0.25, "tuple": [1, 2]}
    atomic_write_json(tmp_path / "out.json", value)
    assert json.loads((tmp_path / "out.json").read_text(), parse_constant=pytest.fail) == expected
    assert json.loads(to_json(value)) == expected


@pytest.mark.parametrize("text, reason", [
    ("[" * 100_000 + "]" * 100_000, "nested"),
    ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "nested"),
    ("9" * 5000, "digits"),
    (b'{"a": "\xff"}', "utf-8"),
])
def test_parse_json_refuses_what_no_record_holds(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_json(text)


def test_parse_json_reads_nan_as_null():
    assert parse_json('{"a": NaN, "b": [Infinity, 1e999], "c": 1}') == {"a": None,
                                                                        "b": [None, None], "c": 1}
