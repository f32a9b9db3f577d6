"""Every command the README shows: each `t2i-*` (and msrun) line of its bash blocks parses through that command's
click options with the README's own flags, each `make` line names a Makefile target, and the README's t2i commands
run in order, with the tiny model and the demo data standing in for SD-1.5 and the naruto set (sizes, steps and the
device scaled to this machine). The README names them by the seed's Hub ids, which resolve offline through an
HF_HOME whose caches hold the tiny model and the demo data under those ids (conftest.hf_home)."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import offline_env

from t2i import export, infer, precompute, train
from t2i.demo import shapes, tiny
from t2i.training.runlog import read_log

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMANDS = {"t2i-precompute": precompute.cli, "t2i-train": train.cli, "t2i-infer": infer.cli,
            "t2i-export": export.cli, "t2i-tiny-model": tiny.tiny_model_cli, "t2i-demo-data": shapes.demo_data_cli}

# What stands in for a real run on this 2-core CPU: sizes, steps and device.
SCALED = [
    ("--resolution 512", "--resolution 32"),
    ("--max_train_steps 15000", "--max_train_steps 2"),
    ("--checkpointing_steps 500", "--checkpointing_steps 1"),
    ("--validation_steps 500", "--validation_steps 2 --validation_inference_steps 2"),
    ("--num_inference_steps 30", "--num_inference_steps 3"),
    ("--device_target Ascend", "--device_target CPU"),
    ("/data/naruto-latents.zarr", "naruto-latents.zarr"),
]

# The README's commands run in one process through their click entry points, as the console scripts call them: each
# command as a process of its own would import MindSpore and mindone again, most of a tiny command's time.
RUN_ALL = """
import json, sys
from t2i import export, infer, precompute, train
clis = {"t2i-precompute": precompute.cli, "t2i-train": train.cli, "t2i-infer": infer.cli, "t2i-export": export.cli}
for name, args in json.loads(sys.argv[1]):
    print(f"=== {name} {' '.join(args)}", flush=True)
    clis[name].main(args, prog_name=name, standalone_mode=False)
"""


def readme_lines() -> list:
    """Every command line of the README's bash blocks, continuations joined, split as the shell splits them."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    return [shlex.split(line) for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_every_readme_command_parses_with_its_flags():
    lines = readme_lines()
    assert {argv[0] for argv in lines} >= {"t2i-precompute", "t2i-train", "t2i-infer", "t2i-export", "make", "msrun"}
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    for argv in lines:
        if argv[0] == "make":
            assert argv[1] in targets, argv
            continue
        if argv[0] == "msrun":  # msrun's own flags, then the training script and its flags
            script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
            assert (ROOT / argv[script]).is_file() and argv[script] == "t2i/train.py"
            argv = ["t2i-train", *argv[script + 1 :]]
        command = COMMANDS[argv[0]]
        with command.make_context(argv[0], argv[1:]) as ctx:  # click's own parse: an unknown flag raises here
            assert ctx.params
    # The seed's form: several prompts after one --validation_prompts.
    train_line = next(a for a in lines if a[0] == "t2i-train" and "--validation_prompts" in a)
    with train.cli.make_context("t2i-train", train_line[1:]) as ctx:
        assert ctx.params["validation_prompts"] == ("yoda", "a man in an orange jacket")


def test_the_parse_check_fails_on_a_flag_that_does_not_exist():
    """The check above is real: click refuses a flag the command lacks."""
    import click

    with pytest.raises(click.NoSuchOption):
        train.cli.make_context("t2i-train", ["--pretrained_model_name_or_path", "m", "--latent_store", "s",
                                             "--validation_epoch", "1"])


def scaled(argv: list) -> list:
    text = shlex.join(argv)
    for real, here in SCALED:
        text = text.replace(real, here)
    return shlex.split(text)


# The README's command lines other tests run, by their first words: each runs there with the same flags but sizes and
# steps, so running it here again would add minutes and no proof.
RUN_ELSEWHERE = {
    ("t2i-precompute", "--pretrained_model_name_or_path", "stabilityai/stable-diffusion-xl-base-1.0"): "test_sdxl",
    ("t2i-train", "--pretrained_model_name_or_path", "stabilityai/stable-diffusion-xl-base-1.0"): "test_sdxl",
    ("t2i-export", "--model", "sd-naruto-lora"): "test_lora_export (kohya, merged)",
    ("t2i-infer", "--model", "stable-diffusion-v1-5/stable-diffusion-v1-5", "--lora"): "test_lora (infer --lora)",
    ("t2i-export", "--model", "sd-naruto-model"): "test_interop (single-file export)",
}


def runs_elsewhere(argv) -> bool:
    return any(tuple(argv[: len(key)]) == key for key in RUN_ELSEWHERE) or "--num_shards" in argv or \
        "--merge_shards" in argv or "--lora_rank" in argv  # test_precompute_shards; test_lora and test_distributed


def test_the_commands_run_elsewhere_are_still_in_the_readme():
    lines = readme_lines()
    for key, where in RUN_ELSEWHERE.items():
        assert any(tuple(argv[: len(key)]) == key for argv in lines), f"no README line starts {key} ({where})"


@pytest.mark.slow
def test_readme_commands_run(hf_home, tmp_path):
    """The README's t2i commands that no other test runs, in its order: precompute by Hub ids, inspect, train with the
    seed's flags together (fp16, accumulation, checkpointing, Min-SNR, EMA, validation, checkpoint limit) and infer
    the result. Not run here: the lines RUN_ELSEWHERE names, `make` (make demo is tests/test_learning.py's run of the
    same stages, make test is this suite) and msrun (tests/test_distributed.py runs t2i/train.py under msrun with
    --distributed)."""
    commands = [(argv[0], scaled(argv)[1:]) for argv in readme_lines()
                if argv[0].startswith("t2i-") and not runs_elsewhere(argv)]
    assert [name for name, _ in commands] == ["t2i-precompute", "t2i-precompute", "t2i-train", "t2i-infer"]
    result = subprocess.run([sys.executable, "-c", RUN_ALL, json.dumps(commands)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=1800, env=offline_env(hf_home, T2I_HOME=str(tmp_path / "t2i-home")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("=== t2i-") == len(commands)
    out = tmp_path / "sd-naruto-model"
    assert (out / "model_index.json").is_file() and (out / "unet").is_dir()
    assert [r["step"] for r in read_log(out / "logs")] == [1, 2]
    assert (out / "checkpoint-2" / "ema.safetensors").is_file()
    assert (out / "validation" / "step-000002.png").is_file()
    assert "t2i latent store" in result.stdout  # --inspect
    assert (tmp_path / "yoda.png").is_file()
