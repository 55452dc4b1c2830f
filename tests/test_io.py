"""diffusion_fast._io: output paths are checked without touching anything; files are replaced whole or not at all."""

from __future__ import annotations

import os
import stat

import pytest
from PIL import Image

from diffusion_fast import _io


def test_write_files_replaces_whole_files_and_keeps_permissions(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.bin"
    a.write_text("old")
    os.chmod(a, 0o640)
    _io.write_files({str(a): b"new a", str(b): b"\x00\x01"})
    assert a.read_bytes() == b"new a" and b.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(a.stat().st_mode) == 0o640
    _io.atomic_write_text(a, "text")
    assert a.read_text() == "text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]


def test_write_files_is_all_or_nothing(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"keep")
    real = _io._write_temp
    monkeypatch.setattr(_io, "_write_temp", lambda p, d: real(p, d) if not p.endswith("/b") else _raise())
    with pytest.raises(OSError, match="disk full"):
        _io.write_files({str(a): b"changed", str(b): b"new"})
    assert a.read_bytes() == b"keep" and not b.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def _raise():
    raise OSError(28, "disk full")


def test_two_names_for_one_file_are_refused(tmp_path):
    (tmp_path / "x").write_bytes(b"x")
    os.symlink(tmp_path / "x", tmp_path / "link")
    with pytest.raises(ValueError, match="same file"):
        _io.write_files({str(tmp_path / "x"): b"1", str(tmp_path / "link"): b"2"})
    assert (tmp_path / "x").read_bytes() == b"x"


@pytest.mark.parametrize("make, match", [
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: os.mkfifo(p), "not a regular file"),
    (lambda p: None, None),
])
def test_check_output_path_touches_nothing(tmp_path, make, match):
    p = tmp_path / "out.png"
    make(p)
    before = sorted(os.listdir(tmp_path))
    if match is None:
        assert _io.check_output_path(p) == str(p)
    else:
        with pytest.raises(ValueError, match=match):
            _io.check_output_path(p)
    assert sorted(os.listdir(tmp_path)) == before
    with pytest.raises(ValueError, match="does not exist"):
        _io.check_output_path(tmp_path / "missing" / "x.png")


@pytest.mark.parametrize("name, ok", [("a.png", True), ("a.jpg", True), ("a.h5", False), ("a.fits", False),
                                      ("a.xbm", False), ("a.unknownext", False), ("a", False)])
def test_check_image_path_encodes_a_blank_image_first(tmp_path, name, ok):
    if ok:
        _io.check_image_path(tmp_path / name, (300, 20), "L")
        assert _io.encode_image(Image.new("L", (3, 2)), name)
    else:
        with pytest.raises(ValueError):
            _io.check_image_path(tmp_path / name, (300, 20), "L")
    assert list(tmp_path.iterdir()) == []
