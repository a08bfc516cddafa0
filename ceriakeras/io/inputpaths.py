"""The input files a command names: folders expanded, each file once, odd paths refused clearly.

:func:`find_inputs` turns the ``INPUT...`` of ``analyze`` into a list of regular files:

- a folder gives its supported files, sorted by name;
- the same file named twice (``a.tif a.tif``, a folder and one of its files, a symbolic or hard
  link to it) is kept once, at its first place; :func:`duplicate_note` words the one-line note;
- a symbolic-link loop, a dangling link, a named pipe (FIFO), a socket or a device is refused in
  one line that says what it is (not "does not exist"), before anything is read from it.

File names are kept as the OS gives them: a name whose bytes are not UTF-8 is a ``str`` with
surrogate escapes (``os.fsdecode``). Tables keep those bytes: ``columns.csv`` and ``frames.csv``
are written with ``errors="surrogateescape"``, so their ``source`` field holds the file's name
byte for byte (a reader opens the CSV with the same error handler, or in binary). Messages show
the name with :func:`shown`: undecodable bytes as ``\\xNN``, so a terminal or a log never
receives invalid UTF-8 and the message is still one line.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..config import InputError


@dataclass
class Inputs:
    """What :func:`find_inputs` found: ``paths`` (each file once, in order) and ``duplicates``
    ((dropped path, the kept path it is the same file as), in order)."""

    paths: list[Path] = field(default_factory=list)
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)


def shown(path) -> str:
    """``path`` for a message: undecodable bytes of the name as ``\\xNN``, control characters
    (a newline in a name) escaped, so the message stays one line of valid UTF-8."""
    text = os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def find_inputs(inputs, suffixes) -> Inputs:
    """The regular files named by ``inputs`` (paths or folders), each once.

    Parameters
    ----------
    inputs : path or sequence of paths
    suffixes : collection of str
        Supported file suffixes, lower case with the dot (``.tif``).

    Raises
    ------
    InputError
        A path does not exist, is a symbolic-link loop, a dangling link, a FIFO, socket or
        device, cannot be read, a folder holds no supported file, a file's type is unknown, or
        nothing is given.
    """
    if isinstance(inputs, (str, bytes, os.PathLike)):
        inputs = [inputs]
    found = Inputs()
    seen: dict[tuple[int, int], Path] = {}
    for item in inputs:
        p = Path(os.fsdecode(item))
        st = _stat(p)
        if stat.S_ISDIR(st.st_mode):
            files = sorted(q for q in _listdir(p) if q.suffix.lower() in suffixes
                           and _is_regular(q))
            if not files:
                raise InputError(f"folder {shown(p)} holds no image files ({', '.join(suffixes)})")
        else:
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"input {shown(p)} is {_kind(st.st_mode)}, not a file: save the "
                                 "image to a regular file and give that")
            if p.suffix.lower() not in suffixes:
                raise InputError(f"{shown(p)}: unknown file type {p.suffix!r}; give one of "
                                 f"{', '.join(suffixes)}")
            files = [p]
        for f in files:
            fst = f.stat()
            key = (fst.st_dev, fst.st_ino)
            if key in seen:
                found.duplicates.append((f, seen[key]))
            else:
                seen[key] = f
                found.paths.append(f)
    if not found.paths:
        raise InputError("no input given: name at least one image, series or folder")
    return found


def duplicate_note(inputs: Inputs) -> str | None:
    """One line saying which inputs were given twice and analysed once, or None."""
    if not inputs.duplicates:
        return None
    dropped, kept = inputs.duplicates[0]
    more = len(inputs.duplicates) - 1
    tail = f" (and {more} more file{'s' if more > 1 else ''} given twice)" if more else ""
    same = "is given twice" if dropped == kept else f"is the same file as {shown(kept)}"
    return f"note: {shown(dropped)} {same}; each file is analysed once{tail}"


def _stat(p: Path) -> os.stat_result:
    try:
        return p.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise InputError(f"input {shown(p)} is a loop of symbolic links: point the link at "
                             "the image file") from None
        if err.errno == errno.ENOENT and p.is_symlink():
            raise InputError(f"input {shown(p)} is a symbolic link to a missing file "
                             f"({shown(os.readlink(p))})") from None
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            raise InputError(f"input {shown(p)} does not exist") from None
        if err.errno == errno.ENAMETOOLONG:
            raise InputError(f"input {shown(p)[:80]}… is a name too long for the file system") from None
        raise InputError(f"cannot read input {shown(p)} ({err.strerror}); check its "
                         "permissions") from None


def _listdir(p: Path) -> list[Path]:
    try:
        return list(p.iterdir())
    except OSError as err:
        raise InputError(f"cannot list folder {shown(p)} ({err.strerror}); check its "
                         "permissions") from None


def _is_regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(p.stat().st_mode)
    except OSError:  # a dangling link or loop inside a folder is not an image file
        return False


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"
