"""The ``ceriakeras`` command line: thin click commands over the library, nothing else.

Every command turns a :class:`ceriakeras.config.CeriakerasError` into one line on stderr
(``error: …``) and exit status 2. Heavy libraries (TensorFlow, abTEM) are imported inside the
commands so that ``--help`` is instant.
"""

from __future__ import annotations

import functools
import sys

import click

from .config import CeriakerasError


def _one_line_errors(func):
    """Report user errors as one line and a non-zero exit instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CeriakerasError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: rerun the same command to resume", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ceriakeras")
def main():
    """Atomic column heights of CeO2 nanoparticles from single low-dose HRTEM images.

    Units everywhere: Å (lengths, pixel sizes), nm (defocus, focal spread), µm (Cs), mm (C5),
    keV (beam energy), e⁻/Å² (dose per image), atoms (column heights).
    """


# --- simulate ----------------------------------------------------------------------------------
# (section owned by the records/simulate work)


# --- train -------------------------------------------------------------------------------------
# (section owned by the train work)


# --- export ------------------------------------------------------------------------------------
# (section owned by the export work)


# --- analyze -----------------------------------------------------------------------------------
# (section owned by the analyze work)


# --- evaluate ----------------------------------------------------------------------------------
# (section owned by the evaluate work)


if __name__ == "__main__":  # pragma: no cover
    main()
