"""Writing output files: a failure never leaves a partial file and never damages an existing one.

Every file is written to a temporary name in its target's directory and then renamed over the target
(``os.replace``, atomic on POSIX), so the target is either untouched or replaced by a complete new file.
A command that writes several files checks every path first (:func:`check_output_path`,
:func:`check_image_path`), before doing any work, then encodes everything in memory, then writes all
temporary files, and renames them only when all of them were written (:func:`write_files`).

    from diffusion_fast import _io
    path = _io.check_image_path("out.png", size=(256, 256), mode="L")   # ValueError: say why, do nothing
    _io.write_files({path: _io.encode_image(picture, path)})            # all or nothing
    _io.atomic_write_text("manifest.json", text)                        # one file

Paths are resolved through symbolic links, so writing to a link replaces the file it points to and keeps
the link. Errors: :class:`ValueError` for a path that cannot be written (its message names the path and the
reason; nothing was touched), :class:`OSError` when writing fails after the checks passed (disk full).
"""

from __future__ import annotations

import io
import os
import secrets
import stat
from collections.abc import Mapping
from typing import Any, Union

PathLike = Union[str, os.PathLike]


def check_output_path(path: PathLike) -> str:
    """Check, without touching anything, that ``path`` can be replaced by a new file; return its real path.

    Refused: a directory, an existing file that is not a regular file (a FIFO would block the writer, a
    device would be written through), a read-only file, a missing parent directory, or a directory where
    no file can be created (checked by creating and removing a temporary file there).
    """
    text = os.fspath(path)
    if not text:
        raise ValueError("the path is empty")
    real = os.path.realpath(text)
    if os.path.isdir(real):
        raise ValueError(f"{text!r} is a directory")
    parent = os.path.dirname(real)
    if not os.path.isdir(parent):
        raise ValueError(f"directory {os.path.dirname(os.path.abspath(text))!r} does not exist")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{text!r} exists and is not a regular file; refusing to replace it")
        if not os.access(real, os.W_OK):
            raise ValueError(f"{text!r} is read-only")
    try:
        fd, tmp = _open_temp(real)
    except OSError as exc:
        raise ValueError(f"{text!r} is not writable: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(tmp)
    return real


def image_format(path: PathLike) -> str:
    """The image format PIL writes for ``path``'s extension (``"PNG"`` for ``.png``); ValueError if none."""
    from PIL import Image

    ext = os.path.splitext(os.fspath(path))[1].lower()
    Image.init()
    fmt = Image.EXTENSION.get(ext)
    if fmt is None:
        raise ValueError(f"unknown image type {ext or '(no extension)'!r}; use .png")
    if fmt not in Image.SAVE:
        raise ValueError(f"PIL reads but cannot write {fmt} images ({ext!r}); use .png")
    return fmt


def check_image_path(path: PathLike, size: tuple[int, int] = (1, 1), mode: str = "L") -> str:
    """:func:`check_output_path`, and that an image of ``size`` (width, height) and PIL ``mode`` can be encoded
    in the format of ``path``'s extension (a blank one is encoded in memory: some formats are read-only or take
    only some modes or sizes). Returns the real path."""
    from PIL import Image

    fmt = image_format(path)
    try:
        _encode(Image.new(mode, size), fmt)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot write a {size[0]}x{size[1]} {mode} image as {fmt}: {exc}") from None
    return check_output_path(path)


def encode_image(image: Any, path: PathLike) -> bytes:
    """A PIL image encoded in the format of ``path``'s extension, in memory (nothing is written)."""
    return _encode(image, image_format(path))


def write_files(files: Mapping[str, bytes]) -> None:
    """Write every ``{path: data}``, all or nothing: each to a temporary file beside its target first, and
    rename them over their targets only when all were written. Paths must be distinct files."""
    real = [os.path.realpath(p) for p in files]
    if len(set(real)) != len(real):
        raise ValueError(f"two outputs name the same file: {sorted(files)}")
    written: list[tuple[str, str]] = []
    try:
        for path, data in zip(real, files.values()):
            written.append((_write_temp(path, data), path))
    except BaseException:
        for tmp, _ in written:
            _unlink_quietly(tmp)
        raise
    for tmp, path in written:
        os.replace(tmp, path)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` by a file holding ``data`` (or leave it as it was when writing fails)."""
    write_files({os.fspath(path): data})


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` by a text file (or leave it as it was when writing fails)."""
    atomic_write_bytes(path, text.encode(encoding))


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when the two paths name one file (through links, or the same new name)."""
    return os.path.realpath(os.fspath(a)) == os.path.realpath(os.fspath(b))


# -- internals -------------------------------------------------------------------------------------------
def _encode(image: Any, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _open_temp(real: str) -> tuple[int, str]:
    """A new file beside ``real`` (mode 0o666 less the umask, as a plain ``open`` would create it)."""
    parent, name = os.path.split(real)
    tmp = os.path.join(parent, f".{name}.{secrets.token_hex(6)}.tmp")
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp


def _write_temp(path: str, data: bytes) -> str:
    """Write ``data`` to a temporary file beside ``path`` (same permissions as an existing target); return its
    name. Removes it again when writing fails."""
    fd, tmp = _open_temp(path)
    try:
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            pass
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
