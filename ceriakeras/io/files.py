"""Project files: reading JSON (one place), writing safely (atomic writes, ordinary permissions), sha256."""


from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ..config import ConfigError

_RAISE = object()


def read_json(path: str | Path, *, error: type[Exception] = ValueError, advice: str = "",
              missing=_RAISE) -> dict:
    """The JSON object in one of the project's files (manifest, progress, run record, model info).

    Parameters
    ----------
    path : path
        The file (UTF-8 JSON holding an object).
    error : exception class
        Raised, with one line naming the file, the reason and ``advice``, for a file that is
        missing, unreadable, not JSON, or not a JSON object.
    advice : str
        What to do about it (e.g. ``"re-export the model"``).
    missing : optional
        Returned instead of raising when the file does not exist.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing is not _RAISE:
            return missing
        reason = "missing"
    except (OSError, ValueError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
    else:
        if isinstance(data, dict):
            return data
        reason = "not a JSON object"
    raise error(f"{path} is unreadable ({reason})" + (f"; {advice}" if advice else ""))


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path, refused if it or a folder above it is a file (results go in a folder).

    Raises
    ------
    ConfigError
    """
    from .inputpaths import shown

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {shown(out_dir)} is a file: choose a folder")
    for parent in out_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {shown(out_dir)} lies under the file {shown(parent)}: "
                                  "choose a folder")
            break
    return out_dir


def give_ordinary_permissions(path: str | Path) -> None:
    """Set the permissions a plain ``open``/``mkdir`` would have given ``path`` (umask applied).

    ``tempfile.mkstemp``/``mkdtemp`` create owner-only files and folders; published results must
    be readable by others (e.g. TF Serving running as another user).
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash, a full disk or an exception leaves no partial file under the final name (the
    temporary file is removed). The temporary name ends in ``.tmp`` so it is never mistaken
    for a result.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    give_ordinary_permissions(tmp)  # mkstemp makes 0600; results are ordinary files
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


