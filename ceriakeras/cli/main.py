"""The ``ceriakeras`` command line: thin click commands over the library, nothing else.

Every command turns a :class:`ceriakeras.config.CeriakerasError` into one line on stderr
(``error: …``) and exit status 2. Heavy libraries (TensorFlow, abTEM) are imported inside the
commands so that ``--help`` is instant, and only after the stages' plan functions (``analysis.plan``, ``nn.plan``, ``evaluation.plan``, ``data.plan``) have checked
the arguments, paths, file headers and the model's JSON, so bad input is refused before
TensorFlow loads. TensorFlow's, absl's and CUDA's own log lines are hidden unless ``--verbose``
is given (``cli.startup``).

The commands live by stage: ``cli.training`` (simulate, train, export, calibrate) and
``cli.analysis`` (analyze, evaluate); ``cli.startup`` holds what every command runs inside.
"""

from __future__ import annotations

import sys

import click

from .analysis import analyze, evaluate
from .startup import one_line
from .training import calibrate, export, simulate, train


class _OneLineGroup(click.Group):
    """Click's usage errors (an unknown option, ``--count 1e12`` for an integer) as one line
    ``error: …`` with exit status 2, like every other refusal, instead of the usage text."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # bare `ceriakeras`: the help
                err.show()
                sys.exit(err.exit_code)
            where = f"{err.ctx.command_path}: " if err.ctx is not None else ""
            click.echo(f"error: {where}{one_line(err.format_message())} (--help lists the "
                       "options)", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            err.show()
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=_OneLineGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ceriakeras")
@click.option("--verbose", is_flag=True,
              help="Show TensorFlow's, absl's and CUDA's own log lines (hidden by default).")
def main(verbose):
    """Atomic column heights of CeO2 nanoparticles from single low-dose HRTEM images.

    Units everywhere: Å (lengths, pixel sizes), nm (defocus, focal spread), µm (Cs), mm (C5),
    keV (beam energy), e⁻/Å² (dose per image), atoms (column heights).

    Arguments, paths, file headers and the model are checked before TensorFlow loads; give
    --verbose (before or after the command name) to see TensorFlow's log.
    """


for _command in (simulate, train, export, calibrate, analyze, evaluate):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
