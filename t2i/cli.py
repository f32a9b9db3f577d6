"""The CLI conventions every command shares: the --device_target option and one-line errors with exit code 2."""

import contextlib
import sys

import click

device_option = click.option(
    "--device_target", default=None, help="CPU, GPU or Ascend (default: $MS_DEVICE_TARGET or detected)."
)


@contextlib.contextmanager
def cli_errors():
    """Bad input ends a command with one line on stderr and exit code 2, not a traceback."""
    try:
        yield
    except (ValueError, FileExistsError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
