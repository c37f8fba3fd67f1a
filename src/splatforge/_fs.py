"""File-system helpers: atomic writes so that no reader ever sees a half-written file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "build_once", "read_input", "remove_stale_temps", "staging_dir"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` (atomic on
    POSIX within one file system), on error it is removed and ``path`` is left untouched.

    The temporary name keeps the suffix of ``path`` so that writers that pick a format from the
    extension (Pillow, numpy) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def build_once(out: str | os.PathLike, build) -> Path:
    """Return folder ``out``, first building it with ``build(tmp_folder)`` if it is not complete.

    The folder is built in a private temporary folder beside ``out`` and renamed into place with
    a ``.complete`` marker, so an interrupted build is redone next time and never mistaken for a
    finished one. Several processes may build the same folder at once (parallel jobs sharing a
    cache): each builds its own copy, the first rename wins and the others discard theirs.
    """
    out = Path(out)
    if (out / ".complete").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        build(tmp)
        (tmp / ".complete").touch()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; give the usual folder mode
        if (out / ".complete").exists():
            return out  # another process finished first
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)  # a stale, incomplete build
        try:
            tmp.rename(out)
        except OSError:
            if not (out / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextmanager
def staging_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a private temporary folder beside ``out``; on success it replaces ``out`` (a folder
    written earlier is removed only once the new one is complete), on error it is removed and
    ``out`` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "x")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete the temporary files :func:`atomic_path` leaves when its process is killed
    (hidden ``.<stem>.<random>.tmp<suffix>`` files) anywhere under ``folder``; returns how many.
    Call it only when no other process is writing into ``folder``."""
    removed = 0
    for p in Path(folder).rglob(".*.tmp*"):
        if p.is_file() and ".tmp" in p.name:
            p.unlink()
            removed += 1
    return removed


def read_input(path: str | os.PathLike) -> bytes:
    """The bytes of an input file.

    Raises:
        DataFormatError: missing or unreadable (the message names the file).
    """
    from splatforge.errors import DataFormatError

    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read: {exc}") from exc
