"""Flags declared once: each stage's config dataclass holds every flag's name, type, default, help and bounds (as
litgpt's configs and transformers' HfArgumentParser do), and its click command is generated from the fields.

    @dataclass(frozen=True)
    class Config:
        resolution: int = flag(512, "Image size.", multiple_of=8)

    cli = command(Config, run, "Help of the command.")

A field's annotation gives the click type (`X | None` is an optional X, `tuple` a repeatable option, `bool` a flag,
`--name/--no_name` when it defaults to true); `check(config)` applies the bounds in the metadata, so a config built in
code is refused as the command line is."""

import dataclasses
import types
import typing

import click

from t2i.core.cli import REDACTED, cli_errors, config_file_option

DEVICE_TARGET_HELP = "CPU or Ascend (default: $MS_DEVICE_TARGET or detected; GPU is refused)."


def flag(default=dataclasses.MISSING, help=None, *, choices=None, min=None, below=None, positive=False,
         multiple_of=None, greedy=False, secret=False, metavar=None, required=None):
    """A config field with its flag's metadata. min: the smallest value allowed; below: values must be smaller;
    positive: values must be above 0;
    multiple_of: a positive multiple; greedy: several values after one flag, as argparse's nargs="+" (repeating the
    flag works too); secret: masked as "***" wherever the config is printed or saved; required: on the command line
    (default: when the field has no default)."""
    meta = {"help": help, "choices": choices, "min": min, "below": below, "positive": positive,
            "multiple_of": multiple_of, "greedy": greedy, "secret": secret, "metavar": metavar, "required": required}
    return dataclasses.field(default=default, metadata={k: v for k, v in meta.items()
                                                        if v is not None and (v is not False or k == "required")})


def _base_type(annotation):
    """(python type, optional) of a field annotation such as `int | None`."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return annotation, False


def check(config):
    """ValueError naming the flag for the first field outside its choices or bounds (None passes: not given)."""
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None:
            continue
        name = f"--{f.name}"
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if "choices" in meta and v not in meta["choices"]:
                raise ValueError(f"{name} must be one of {', '.join(map(str, meta['choices']))}, got {v!r}")
            if "multiple_of" in meta and (v < meta["multiple_of"] or v % meta["multiple_of"]):
                raise ValueError(f"{name} must be a positive multiple of {meta['multiple_of']}, got {v}")
            if meta.get("positive") and not v > 0:
                raise ValueError(f"{name} must be positive, got {v}")
            if "min" in meta and v < meta["min"]:
                raise ValueError(f"{name} must be at least {meta['min']}, got {v}")
            if "below" in meta and not v < meta["below"]:
                raise ValueError(f"{name} must be below {meta['below']}, got {v}")


def public_dict(config) -> dict:
    """The config as printed and saved (config files, checkpoints, model cards): secrets never leave."""
    d = dataclasses.asdict(config)
    for f in dataclasses.fields(config):
        if f.metadata.get("secret") and d[f.name]:
            d[f.name] = REDACTED
    return d


def option(f: dataclasses.Field, annotation) -> click.Option:
    """The click option of one config field."""
    kind, optional = _base_type(annotation)
    meta = f.metadata
    has_default = f.default is not dataclasses.MISSING
    kwargs = {"help": meta.get("help"), "required": meta.get("required", not has_default)}
    if has_default:
        kwargs["default"] = f.default
    if "metavar" in meta:
        kwargs["metavar"] = meta["metavar"]
    decls = [f"--{f.name}"]
    if kind is bool:
        if f.default is True:
            decls = [f"--{f.name}/--no_{f.name}"]
        else:
            kwargs["is_flag"] = True
    elif kind is tuple:
        kwargs.update(multiple=True, default=f.default if has_default else ())
    elif "choices" in meta:
        kwargs["type"] = click.Choice([str(c) for c in meta["choices"]])
    else:
        kwargs["type"] = kind
    opt = click.Option(decls, **kwargs)
    opt.greedy = meta.get("greedy", False)
    return opt


class Command(click.Command):
    """A click command whose greedy options take several values after one flag (`--validation_prompts a b`, the
    seed script's argparse nargs="+"): each value after the first is read as the flag repeated."""

    def parse_args(self, ctx, args):
        greedy = {name for p in self.params if getattr(p, "greedy", False) for name in p.opts}
        out, i = [], 0
        while i < len(args):
            arg = args[i]
            out.append(arg)
            i += 1
            if arg == "--":
                out += args[i:]
                break
            if arg in greedy and i < len(args):
                out.append(args[i])
                i += 1
                while i < len(args) and not args[i].startswith("-"):
                    out += [arg, args[i]]
                    i += 1
        return super().parse_args(ctx, out)


def command(config_cls, run, help: str, extra=(), prepare=None) -> click.Command:
    """The click command of a stage: one option per field of config_cls (in field order), the `extra` click options
    that are not config (such as --inspect), and --config FILE. It builds config_cls from the options and calls
    run(config) (stages pass `lambda config: run(config)`, so that the module's `run` is looked up at each call, as
    a test that replaces it expects); `prepare(kwargs)` may handle the extra options first and return True when it
    did all the work.
    Errors end it with one line and exit code 2 (cli_errors)."""
    hints = typing.get_type_hints(config_cls)
    params = [option(f, hints[f.name]) for f in dataclasses.fields(config_cls)] + list(extra)

    def callback(**kwargs):
        with cli_errors():
            if prepare is not None and prepare(kwargs):
                return
            for f in dataclasses.fields(config_cls):
                if _base_type(hints[f.name])[0] is tuple:
                    kwargs[f.name] = tuple(kwargs[f.name])
            run(config_cls(**kwargs))

    cmd = Command(name=None, params=params, callback=callback, help=help, context_settings={"show_default": True})
    return config_file_option(cmd)
