"""The CLI conventions every command shares: --config files and one-line errors with exit code 2 (the options
themselves come from each stage's config dataclass, t2i/core/flags.py)."""

import contextlib
import copy
import json
import sys
import tomllib
from pathlib import Path

import click

# What a saved config holds in place of a secret (TrainConfig.public_dict's --hub_token): read back, it means "absent".
REDACTED = "***"
CONFIG_SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def first_line(e: Exception) -> str:
    """An exception as one line: PIL's and `datasets`' messages can span many."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


@contextlib.contextmanager
def cli_errors():
    """Bad input ends a command with one line on stderr and exit code 2, not a traceback."""
    try:
        yield
    except (ValueError, FileExistsError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


def config_file_option(command):
    """Add `--config FILE` to a click command: decorate its function (like click.option), or wrap a built
    click.Command, which is copied (a command that already has --config is returned as it is).

    The file (.toml, .yaml/.yml or .json) maps flag names without dashes to values: lists for repeatable options,
    true/false for flags (`jit = false` for --no_jit), null or "***" (a masked secret) for the default. Its values
    become the command's defaults, so flags on the command line override them, and click checks them as it checks
    the command line; an unknown key is an error naming it and the file."""
    attrs = dict(type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False,
                 callback=_apply_config_file, metavar="FILE",
                 help="A .toml, .yaml or .json file of flag values (keys: flag names without dashes); command-line "
                      "flags override it.")
    if not isinstance(command, click.Command):
        return click.option("--config", **attrs)(command)
    if any(param.name == "config" for param in command.params):
        return command
    wrapped = copy.copy(command)
    wrapped.params = [*command.params, click.Option(["--config"], **attrs)]
    return wrapped


def _apply_config_file(ctx, param, path):
    # Eager, so this runs before any other option reads its default from ctx.default_map.
    if path is not None:
        defaults = _file_defaults(ctx.command, ctx.command_path, _read_config(path), path)
        ctx.default_map = {**(ctx.default_map or {}), **defaults}


def _read_config(path) -> dict:
    suffix = Path(path).suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise click.BadParameter(f"{path}: use a {', '.join(CONFIG_SUFFIXES)} file")
    try:
        text = Path(path).read_text(encoding="utf-8")
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml  # PyYAML comes with transformers and huggingface_hub

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(e) from e
    except ValueError as e:
        raise click.BadParameter(f"{path} is not valid {suffix[1:].upper()}: {' '.join(str(e).split())}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a table of flag names and values, not a {type(data).__name__}")
    return data


def _file_defaults(command, command_path: str, values: dict, path) -> dict:
    """The file's values as ctx.default_map entries: keyed by parameter name, as the strings the command line would
    pass (so 2.5 for an int option is refused as on the command line, not truncated)."""
    options = {opt[2:]: param for param in command.params if isinstance(param, click.Option) and param.name != "config"
               for opt in param.opts if opt.startswith("--")}
    unknown = sorted(set(values) - set(options))
    if unknown:
        negated = {opt[2:]: param.opts[0][2:] for param in command.params if isinstance(param, click.Option)
                   for opt in param.secondary_opts}
        hints = "".join(f"; write {negated[key]} = false for --{key}" for key in unknown if key in negated)
        plural = len(unknown) > 1
        raise click.BadParameter(f"{path}: unknown key{'s' * plural} {', '.join(unknown)} "
                                 f"(not {'flags' if plural else 'a flag'} of {command_path}{hints})")
    defaults = {}
    for key, value in values.items():
        param = options[key]
        if value is None or value == REDACTED:
            continue
        if isinstance(value, list) and not param.multiple:
            raise click.BadParameter(f"{path}: {key} takes one value, got a list")
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, (list, dict)) for item in items):
            raise click.BadParameter(f"{path}: {key} takes {'a list of ' if param.multiple else ''}plain values")
        texts = [str(item).lower() if isinstance(item, bool) else str(item) for item in items]
        defaults[param.name] = texts if param.multiple else texts[0]
    return defaults
