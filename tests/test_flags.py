"""Each flag declared once: every option of every command is a field of that command's config dataclass, with the
field's default and help (t2i.core.flags builds the options from the fields), and the fields' bounds refuse a config
built in code as they refuse the command line."""

import dataclasses

import click
import pytest

from t2i import export, infer, precompute, train
from t2i.demo import shapes, tiny

# command -> (its config dataclass, the options that are not config: each with the reason)
COMMANDS = {
    "t2i-precompute": (precompute.cli, precompute.PrecomputeConfig, {"inspect_store": "prints a store and exits"}),
    "t2i-train": (train.cli, train.TrainConfig, {}),
    "t2i-infer": (infer.cli, infer.InferConfig, {}),
    "t2i-export": (export.cli, export.ExportConfig, {}),
    "t2i-tiny-model": (tiny.tiny_model_cli, tiny.TinyModelConfig, {}),
    "t2i-demo-data": (shapes.demo_data_cli, shapes.DemoDataConfig, {}),
}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_is_a_config_field_with_its_default_and_help(name):
    command, config_cls, extra = COMMANDS[name]
    options = {p.name: p for p in command.params if isinstance(p, click.Option) and p.name != "config"}
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    assert set(options) == set(fields) | set(extra)
    assert any(p.name == "config" for p in command.params), f"{name} has no --config"
    for field_name, f in fields.items():
        opt = options[field_name]
        assert opt.opts[0] == f"--{field_name}"
        assert opt.help == f.metadata.get("help"), field_name
        if f.default is not dataclasses.MISSING:
            assert opt.default == f.default, field_name
            assert not opt.required, field_name
        if "choices" in f.metadata:
            assert list(opt.type.choices) == [str(c) for c in f.metadata["choices"]], field_name


def test_greedy_option_takes_the_seeds_form_and_repeats():
    base = ["--pretrained_model_name_or_path", "m", "--latent_store", "s"]
    for args, prompts in [
        (["--validation_prompts", "yoda", "a red circle", "--seed", "3"], ("yoda", "a red circle")),
        (["--validation_prompts", "yoda", "--validation_prompts", "a red circle"], ("yoda", "a red circle")),
        (["--validation_prompts", "a", "b", "--validation_prompts", "c"], ("a", "b", "c")),
        (["--validation_prompts", "yoda"], ("yoda",)),
    ]:
        with train.cli.make_context("t2i-train", base + args) as ctx:
            assert ctx.params["validation_prompts"] == prompts, args
    with train.cli.make_context("t2i-train", base + ["--validation_prompts", "a", "b", "--seed", "3"]) as ctx:
        assert ctx.params["seed"] == 3
    # Only the greedy option takes several values: --prompt of t2i-infer is one value a flag.
    with pytest.raises(click.UsageError):
        infer.cli.make_context("t2i-infer", ["--prompt", "a", "b"])


@pytest.mark.parametrize("kwargs,message", [
    ({"train_batch_size": 0}, "--train_batch_size must be at least 1, got 0"),
    ({"lr_scheduler": "cosine_annealing"}, "--lr_scheduler must be one of linear, cosine"),
    ({"validation_height": 36}, "--validation_height must be a positive multiple of 8, got 36"),
    ({"caption_dropout_probability": 1.0}, "--caption_dropout_probability must be below 1, got 1.0"),
    ({"mixed_precision": "fp8"}, "--mixed_precision must be one of no, fp16, bf16, got 'fp8'"),
    ({"learning_rate": 0.0}, "--learning_rate must be positive, got 0.0"),
])
def test_bounds_refuse_a_config_built_in_code(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(pretrained_model_name_or_path="m", latent_store="s", **kwargs)


def test_bounds_refuse_the_command_line_in_one_line():
    from click.testing import CliRunner

    result = CliRunner().invoke(precompute.cli, ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d",
                                                 "--resolution", "500"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --resolution must be a positive multiple of 8, got 500"


def test_secrets_are_masked_wherever_the_config_is_shown():
    config = train.TrainConfig(pretrained_model_name_or_path="m", latent_store="s", hub_token="hf_secret")
    assert config.public_dict()["hub_token"] == "***" and config.hub_token == "hf_secret"
