"""What every command runs inside: user errors as one line and exit status 2, the ``--out``
lock, ``--verbose``, and the quiet start-up that keeps TensorFlow's, absl's and CUDA's own log
lines off the terminal unless ``--verbose`` is given (:func:`quiet_libraries`)."""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib.abc
import logging
import os
import sys

import click

from ..config import CeriakerasError

_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def one_line_errors(func):
    """Report user errors as one line and a non-zero exit instead of a traceback; library log
    lines stay off the terminal meanwhile (:func:`quiet_libraries`)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        finder = quiet_libraries()
        try:
            return func(*args, **kwargs)
        except CeriakerasError as err:
            end_progress_bars()
            click.echo(f"error: {one_line(str(err))}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: rerun the same command to resume", err=True)
            sys.exit(130)
        except OSError as err:  # a full disk or a folder we may not write: one line, not a trace
            if err.errno not in _WRITE_ERRNOS:
                raise
            end_progress_bars()
            where = f" ({one_line(os.fsdecode(err.filename))})" if err.filename else ""
            click.echo(f"error: {err.strerror or errno.errorcode[err.errno]}{where}; free space or "
                       "choose a folder you may write to, then rerun the same command (finished "
                       "parts are kept)", err=True)
            sys.exit(2)
        finally:
            if finder in sys.meta_path:  # TensorFlow was not needed: leave the importer as it was
                sys.meta_path.remove(finder)

    return wrapper


def escaped(text: str) -> str:
    """``text`` as valid UTF-8: undecodable file-name bytes (surrogate escapes) as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def one_line(text: str) -> str:
    """``text`` as one line of valid UTF-8 (:func:`escaped`, line breaks as spaces)."""
    return " ".join(escaped(text).splitlines())


def end_progress_bars() -> None:
    """Close open tqdm bars, so that an error line starts on a line of its own (in a log file a
    bar ends in a carriage return, not a newline)."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is None:
        return
    for bar in list(getattr(tqdm.tqdm, "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


def locked(out_dir, fresh_names=()):
    """The ``--out`` lock of a command (:func:`ceriakeras.io.outlock.locked_out_dir`)."""
    from ..io.outlock import locked_out_dir

    return locked_out_dir(out_dir, fresh_names=fresh_names)


def _verbose() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("verbose"))


@contextlib.contextmanager
def _stderr_to_devnull():
    """File descriptor 2 goes to ``/dev/null`` inside the block (C++ libraries write there
    directly, not through ``sys.stderr``)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to keep quiet
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.close(null)
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


class _QuietLoader(importlib.abc.Loader):
    """Runs TensorFlow's own loader, then lists its devices, with stderr sent to /dev/null;
    afterwards the ``tensorflow`` and ``absl`` Python loggers show errors only."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with _stderr_to_devnull():
            self._loader.exec_module(module)
            # cuInit happens here, still in the window; should listing fail, the stage that
            # uses the devices reports it
            with contextlib.suppress(Exception):
                module.config.list_physical_devices()
        import absl.logging

        module.get_logger().setLevel(logging.ERROR)
        absl.logging.set_verbosity(absl.logging.ERROR)

    def __getattr__(self, name):  # resource readers etc. of the wrapped loader
        return getattr(self._loader, name)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as the other finders do and gives it a :class:`_QuietLoader`; once."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


def quiet_libraries() -> importlib.abc.MetaPathFinder | None:
    """Library log lines that are not errors stay off the terminal unless ``--verbose``.

    TensorFlow prints lines before its logging is set up (``All log messages before
    absl::InitializeLog()``, oneDNN, ``cudart_stub``, ``cpu_feature_guard``) and, on a machine
    without a GPU, ``E0000 … failed call to cuInit`` when its devices are first listed;
    ``TF_CPP_MIN_LOG_LEVEL`` silences only some of them. So, unless ``--verbose``, whenever
    TensorFlow is first imported (by whichever stage needs it, after the checks) the import and
    the device discovery run with file descriptor 2 sent to ``/dev/null``
    (:class:`_QuietTensorFlowFinder`); ``TF_CPP_MIN_LOG_LEVEL=3`` (unless already set) keeps
    TensorFlow's later C++ lines away, errors included (training prints ``E0000 … oneDNN
    supports DT_UINT8 only on platforms with AVX-512`` on its first step: a notice, not a
    failure), and the ``tensorflow`` and ``absl`` Python loggers show errors only. Errors that
    matter still reach the user as exceptions, reported by the command. With ``--verbose``
    nothing is changed.
    """
    if _verbose():
        return None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("tifffile").setLevel(logging.ERROR)  # header damage is our one line
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorFlowFinder)
                                          for f in sys.meta_path):
        return None
    finder = _QuietTensorFlowFinder()
    sys.meta_path.insert(0, finder)
    return finder


def _set_verbose(ctx, param, value):
    if value:
        ctx.find_root().params["verbose"] = True


def verbose_option(func):
    """``--verbose`` after the command name too (``ceriakeras analyze --verbose …``)."""
    return click.option("--verbose", is_flag=True, expose_value=False, callback=_set_verbose,
                        help="Show TensorFlow's, absl's and CUDA's own log lines.")(func)
