"""--config FILE (t2i.core.cli.config_file_option) on the real t2i-precompute, t2i-train and t2i-infer commands, with each
stage's run() replaced by a recorder: what reaches the config, what overrides what, and what is refused."""

import dataclasses
import json
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner

from t2i import infer, precompute, train
from t2i.core.cli import config_file_option
from t2i.infer import InferConfig
from t2i.precompute import PrecomputeConfig
from t2i.train import CONFIG_NAME, TrainConfig

REQUIRED = 'pretrained_model_name_or_path = "base-model"\nlatent_store = "latents.zarr"\n'


@pytest.fixture
def runs(monkeypatch):
    """The configs each stage's cli would have run."""
    seen = []
    for module in (precompute, train, infer):
        monkeypatch.setattr(module, "run", seen.append)
    return seen


def invoke(module, *args, prog="t2i-cmd"):
    return CliRunner().invoke(config_file_option(module.cli), [str(a) for a in args], prog_name=prog)


def error_line(result):
    """click's error for bad input: exit code 2 and one 'Error:' line."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def write(path, text):
    path.write_text(text)
    return path


def test_file_values_reach_the_config_and_satisfy_required_options(tmp_path, runs):
    cfg = write(tmp_path / "train.toml", REQUIRED + """
train_batch_size = 3
learning_rate = 2e-4
snr_gamma = 5
validation_prompts = ["a red circle", "a blue square"]
use_ema = true
jit = false
lr_scheduler = "cosine"
device_target = "CPU"
""")
    result = invoke(train, "--config", cfg)
    assert result.exit_code == 0, result.output
    assert runs == [TrainConfig(pretrained_model_name_or_path="base-model", latent_store="latents.zarr",
                                train_batch_size=3, learning_rate=2e-4, snr_gamma=5.0,
                                validation_prompts=("a red circle", "a blue square"), use_ema=True, jit=False,
                                lr_scheduler="cosine", device_target="CPU")]


def test_command_line_overrides_the_file(tmp_path, runs):
    cfg = write(tmp_path / "train.toml", REQUIRED + """
train_batch_size = 3
learning_rate = 2e-4
validation_prompts = ["a red circle", "a blue square"]
jit = false
""")
    result = invoke(train, "--train_batch_size", 5, "--validation_prompts", "yoda", "--jit", "--config", cfg,
                    "--latent_store", "other.zarr")
    assert result.exit_code == 0, result.output
    (config,) = runs
    assert (config.train_batch_size, config.validation_prompts, config.jit, config.latent_store) == (
        5, ("yoda",), True, "other.zarr")
    assert config.learning_rate == 2e-4  # what the command line leaves alone still comes from the file


def test_unknown_key_is_one_line_naming_key_and_file(tmp_path, runs):
    cfg = write(tmp_path / "typo.toml", REQUIRED + "train_batch_sise = 3\n")
    line = error_line(invoke(train, "--config", cfg, prog="t2i-train"))
    assert "train_batch_sise" in line and str(cfg) in line and "t2i-train" in line
    assert runs == []
    # The off switch of --jit/--no_jit is not a key of its own; the error says how to write it.
    line = error_line(invoke(train, "--config", write(tmp_path / "neg.toml", REQUIRED + "no_jit = true\n")))
    assert "no_jit" in line and "jit = false" in line


@pytest.mark.parametrize("value", ['"many"', "2.5", "true"])
def test_wrong_type_is_the_error_the_command_line_gives(tmp_path, runs, value):
    """Values go through click as command-line text: 2.5 for an int option is refused, not truncated to 2."""
    from_file = invoke(train, "--config", write(tmp_path / "bad.toml", REQUIRED + f"train_batch_size = {value}\n"))
    on_line = invoke(train, "--config", write(tmp_path / "ok.toml", REQUIRED), "--train_batch_size", value.strip('"'))
    assert "--train_batch_size" in error_line(from_file)
    assert error_line(from_file) == error_line(on_line)
    assert runs == []


def saved_config(tmp_path, config: TrainConfig):
    """What a training run writes beside its pipeline."""
    path = tmp_path / "output" / CONFIG_NAME
    path.parent.mkdir()
    path.write_text(json.dumps(config.public_dict(), indent=2))
    return path


def test_saved_train_config_repeats_the_run(tmp_path, runs):
    config = TrainConfig(
        pretrained_model_name_or_path="base-model", latent_store="latents.zarr", output_dir="out", seed=7,
        train_batch_size=2, max_train_steps=40, gradient_accumulation_steps=3, gradient_checkpointing=True,
        learning_rate=3e-5, lr_scheduler="cosine", lr_warmup_steps=0, adam_epsilon=1e-7, max_grad_norm=0.5,
        snr_gamma=5.0, prediction_type="v_prediction", noise_offset=0.05, caption_dropout_probability=0.1,
        use_ema=True, ema_decay=0.999, checkpoints_total_limit=2, validation_prompts=("a red circle", "yoda"),
        validation_steps=10, report_to="none", jit=False, device_target="CPU", lora_rank=4, lora_dropout=0.1)
    saved = json.loads(saved_config(tmp_path, config).read_text())
    assert saved["resume_from_checkpoint"] is None and saved["hub_token"] is None  # nulls are in the file
    result = invoke(train, "--config", tmp_path / "output" / CONFIG_NAME)
    assert result.exit_code == 0, result.output
    assert runs == [config]


def test_null_means_the_default_and_a_masked_token_is_no_token(tmp_path, runs):
    config = TrainConfig(pretrained_model_name_or_path="base-model", latent_store="latents.zarr", push_to_hub=True,
                         hub_model_id="me/sd-model", hub_token="hf_secret")
    path = saved_config(tmp_path, config)
    saved = json.loads(path.read_text())
    assert saved["hub_token"] == "***"
    path.write_text(json.dumps({**saved, "train_batch_size": None}))
    assert invoke(train, "--config", path).exit_code == 0
    assert runs[-1] == dataclasses.replace(config, hub_token=None)  # train_batch_size null: the default, 16
    assert invoke(train, "--config", path, "--hub_token", "hf_secret").exit_code == 0
    assert runs[-1] == config  # a token on the command line is used


INFER_SETTINGS = {
    ".toml": 'prompt = ["a red circle", "a blue square"]\nnum_inference_steps = 4\nguidance_scale = 3\n'
             'scheduler = "ddim"\noverwrite = true\nlora = "adapter:0.5"\nnegative_prompt = "blurry"\n',
    ".yaml": "prompt:\n  - a red circle\n  - a blue square\nnum_inference_steps: 4\nguidance_scale: 3\n"
             "scheduler: ddim\noverwrite: true\nlora: adapter:0.5\nnegative_prompt: blurry\n",
    ".json": '{"prompt": ["a red circle", "a blue square"], "num_inference_steps": 4, "guidance_scale": 3, '
             '"scheduler": "ddim", "overwrite": true, "lora": "adapter:0.5", "negative_prompt": "blurry"}',
}


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_each_format_configures_infer(tmp_path, runs, suffix):
    """Also: --prompt (required, repeatable) from a list, --lora (repeatable) from one string, an int for a float."""
    result = invoke(infer, "--config", write(tmp_path / f"infer{suffix}", INFER_SETTINGS[suffix]))
    assert result.exit_code == 0, result.output
    assert runs == [InferConfig(prompt=("a red circle", "a blue square"), num_inference_steps=4, guidance_scale=3.0,
                                scheduler="ddim", overwrite=True, lora=("adapter:0.5",), negative_prompt="blurry")]


def test_yml_configures_precompute_and_keys_are_flag_names(tmp_path, runs, monkeypatch):
    cfg = write(tmp_path / "precompute.yml", "pretrained_model_name_or_path: base-model\ntrain_data_dir: data\n"
                                             "resolution: 64\ncenter_crop: true\nrandom_flip: false\n")
    result = invoke(precompute, "--config", cfg, "--random_flip")
    assert result.exit_code == 0, result.output
    assert runs == [PrecomputeConfig(pretrained_model_name_or_path="base-model", output_dir="latents.zarr",
                                     train_data_dir="data", resolution=64, center_crop=True, random_flip=True)]
    # --inspect's parameter is named inspect_store; the file uses the flag's name, as everywhere.
    monkeypatch.setattr(precompute, "LatentStore", SimpleNamespace(
        open=lambda path, flag: SimpleNamespace(describe=lambda: f"described {path}")))
    result = invoke(precompute, "--config", write(tmp_path / "inspect.toml", 'inspect = "some.zarr"\n'))
    assert (result.exit_code, result.output) == (0, "described some.zarr\n")


def test_unreadable_config_files_are_clear_errors(tmp_path, runs):
    missing = tmp_path / "missing.toml"
    line = error_line(invoke(train, "--config", missing))
    assert str(missing) in line and "does not exist" in line
    line = error_line(invoke(train, "--config", write(tmp_path / "broken.toml", "train_batch_size 3\n")))
    assert "broken.toml is not valid TOML" in line and "line 1" in line
    line = error_line(invoke(train, "--config", write(tmp_path / "list.yaml", "- train_batch_size\n")))
    assert "list.yaml must hold a table" in line
    line = error_line(invoke(train, "--config", write(tmp_path / "train.ini", "train_batch_size = 3\n")))
    assert "train.ini" in line and ".toml" in line
    line = error_line(invoke(train, "--config", write(tmp_path / "two.toml", REQUIRED + "output_dir = ['a', 'b']\n")))
    assert "output_dir takes one value" in line
    assert runs == []


def test_wrapping_copies_the_command_once_and_decorating_a_function_works(tmp_path):
    def show(steps):
        click.echo(steps)

    steps = click.Option(["--steps"], type=int, default=1)
    plain = click.Command("plain", params=[steps], callback=show)
    wrapped = config_file_option(plain)
    assert plain.params == [steps]  # the command wrapped is left as it was
    assert config_file_option(wrapped) is wrapped
    assert [p.name for p in wrapped.params] == ["steps", "config"]

    decorated = click.command("decorated")(config_file_option(click.option("--steps", type=int, default=1)(show)))
    toy = write(tmp_path / "toy.json", '{"steps": 9}')
    for command in (wrapped, decorated):
        result = CliRunner().invoke(command, ["--config", str(toy)])
        assert (result.exit_code, result.output) == (0, "9\n")
