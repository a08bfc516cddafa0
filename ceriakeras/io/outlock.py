"""One command at a time per ``--out`` folder: an OS file lock held for the command's life.

:func:`locked_out_dir` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on a file descriptor opened on
the ``--out`` folder itself, so nothing is written into the folder for the lock, and the OS drops
the lock when the process ends, however it ends (no stale marker file after a kill). A second
``analyze``, ``simulate``, ``train``, ``export`` or ``calibrate`` into a folder that is locked is
refused in one line that names the running process (its pid and command line, read from
``/proc/locks`` where the system has it).

The lock protects against two runs of this program. It is advisory: other programs writing into
the folder are not stopped, and on network file systems whose ``flock`` is local to one machine
(older NFS) two machines are not kept apart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ..config import ConfigError


@contextlib.contextmanager
def locked_out_dir(out_dir: str | Path, *, fresh_names=(), option: str = "--out"
                   ) -> Iterator[Path]:
    """Create ``out_dir`` if needed and hold an exclusive lock on it inside the block.

    If the block raises a :class:`~ceriakeras.config.CeriakerasError` (a refusal) and the folder
    was absent or empty before, the start-up files the command wrote (``fresh_names``) are
    removed, and then the folder if it is empty, so a refused run leaves no trace that blocks
    the corrected rerun. A folder holding anything else (results) is left as it is.

    Parameters
    ----------
    out_dir : str or Path
        The command's output folder.
    fresh_names : sequence of str
        Names of files or folders the command writes first (e.g. ``train``'s ``config.json``).
    option : str
        The option's name in messages.

    Raises
    ------
    ConfigError
        ``out_dir`` is a file, cannot be created, or another run holds its lock (the message
        names that run's pid and command line).
    """
    from ..config import CeriakerasError
    from .inputpaths import shown

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{option} {shown(out)} is a file: choose a folder")
    fresh = not out.exists() or not any(out.iterdir())
    made = [p for p in (out, *out.absolute().parents) if not p.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{option} {shown(out)} lies under a file: choose a writable "
                          f"{option} folder") from None
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise ConfigError(f"{option} {shown(out)} is in use by another run "
                              f"({lock_holder(fd)}); wait for it to finish or choose another "
                              f"{option}") from None
        try:
            yield out
        except CeriakerasError:
            if fresh and _remove_fresh(out, fresh_names):
                for parent in made[1:]:  # the folders above that this command created
                    with contextlib.suppress(OSError):
                        parent.rmdir()
            raise
    finally:
        os.close(fd)  # releases the lock


def _remove_fresh(out: Path, fresh_names) -> bool:
    """Remove ``out`` if it holds nothing but ``fresh_names`` (they are removed first); whether
    it was removed."""
    import shutil

    entries = list(out.iterdir())
    if any(e.name not in fresh_names for e in entries):
        return False
    try:
        for e in entries:
            if e.is_dir() and not e.is_symlink():
                shutil.rmtree(e)
            else:
                e.unlink()
        out.rmdir()
    except OSError:
        return False
    return True


def lock_holder(fd: int) -> str:
    """Who holds the flock on the file open as ``fd``: ``"pid N: COMMAND LINE"``, best effort
    (from ``/proc/locks`` and ``/proc/N/cmdline``; ``"another process"`` where unknown)."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "another process"
    for line in lines:
        fields = line.split()
        if "FLOCK" in fields and ident in fields:
            pid = fields[fields.index(ident) - 1]
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                return f"pid {pid}"
            command = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "backslashreplace")
            if len(command) > 160:
                command = command[:157] + "..."
            return f"pid {pid}: {command}" if command else f"pid {pid}"
    return "another process"
