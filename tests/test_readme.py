"""Every command the README shows runs, with the tiny model and the demo data in place of SD-1.5 and the naruto set and
the same flags otherwise (steps, sizes, worker counts and the device scaled to this machine), so a flag that stops
working fails here instead of in a user's first run. The README names them by the seed's Hub ids, which resolve
offline through an HF_HOME whose caches hold the tiny model and the demo data under those ids (conftest.hf_home)."""

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import offline_env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Blocks not run here, each with the reason; any other bash block in the README must run.
NOT_RUN = {
    "make demo": "the whole demo runs in tests/test_learning.py",
    "make precompute": "the demo's stages, run by tests/test_learning.py through t2i.demo with the same settings",
    "# node 0": "two msrun nodes; the one-node msrun block above runs the same flags on 2 workers",
}

# What stands in for a real run on this 2-core CPU: paths, then sizes, steps, workers and device.
SCALED = [
    ("--resolution 512", "--resolution 32"),
    ("--max_train_steps 15000", "--max_train_steps 2"),
    ("--checkpointing_steps 500", "--checkpointing_steps 1"),
    ("--validation_steps 500", "--validation_steps 2 --validation_inference_steps 2"),
    ("--num_inference_steps 30", "--num_inference_steps 3"),
    ("--device_target Ascend", "--device_target CPU"),
    ("--worker_num=8 --local_worker_num=8", "--worker_num=2 --local_worker_num=2"),
    ("for k in 0 1 2 3 4 5 6 7", "for k in 0 1"),
    ("--num_shards 8", "--num_shards 2"),
    ("--merge_shards 8", "--merge_shards 2"),
]


def bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def runnable_blocks():
    blocks = bash_blocks(README.read_text())
    return [b for b in blocks if not any(b.lstrip().startswith(key) for key in NOT_RUN)]


def localise(block, work):
    block = block.replace("/data/naruto-latents.zarr", str(work / "naruto-latents.zarr"))
    block = block.replace("source .venv/bin/activate", f"source {ROOT / '.venv' / 'bin' / 'activate'}")
    for real, here in SCALED:
        block = block.replace(real, here)
    return block


def test_every_bash_block_is_run_or_excused():
    blocks = bash_blocks(README.read_text())
    excused = [b for b in blocks if any(b.lstrip().startswith(key) for key in NOT_RUN)]
    assert len(excused) == len(NOT_RUN), "a NOT_RUN key no longer starts a README block"
    assert len(runnable_blocks()) == 4, "README bash blocks changed: check that test_readme_commands covers them"
    for real, _ in SCALED:
        assert real in README.read_text(), f"{real!r} is no longer in the README: update SCALED"


@pytest.mark.slow
def test_readme_commands(hf_home, tmp_path):
    """The SD-1.5 block (precompute -> train -> infer), sharded precompute, msrun training and the export, in the
    order the README gives them, in one shell session so that MODEL, DATA and FLAGS carry over."""
    blocks = runnable_blocks()
    env = offline_env(hf_home)
    script = "set -euo pipefail\n" + "\n".join(localise(b, tmp_path) for b in blocks)
    # The timeout only guards against a hang: the whole README took 677-1027 s in CI and passed 1500 s under heavy load.
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=2700)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "sd-naruto-model"
    assert (out / "model_index.json").is_file() and (out / "unet").is_dir()
    assert (tmp_path / "yoda.png").is_file() and (tmp_path / "sd-naruto.safetensors").is_file()
    assert (tmp_path / "naruto-latents.zarr" / "zarr.json").is_file()
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]  # the msrun run (2 steps) replaced the single-process one
    assert (out / "checkpoint-2" / "ema.safetensors").is_file()
