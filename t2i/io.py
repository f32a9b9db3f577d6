"""What the commands share at their edges: crash-safe output (written to a temporary sibling, then renamed into
place) and the CLI conventions (the --device_target option, one-line errors with exit code 2)."""

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import click


@contextlib.contextmanager
def atomic_dir(path, overwrite: bool = True):
    """Yield a temp folder beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


def atomic_write_bytes(path, data: bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


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
