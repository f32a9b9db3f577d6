import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from t2i import train
from t2i.data.store import LatentStore
from t2i.interop import lora
from t2i.train import TrainConfig, run
from t2i.training.buckets import Buckets, StepBatches
from t2i.training.rows import split_holdout
from t2i.training.runlog import read_log

COMMON = dict(max_train_steps=2, learning_rate=1e-2, adam_epsilon=1.0, checkpointing_steps=1, num_validation_samples=4,
              report_to="none", lr_scheduler="constant", seed=3)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_and_two_workers(tiny_model, tiny_store, tmp_path, **flags):
    """The same training in this process (1 worker x batch 4) into tmp_path/one and under msrun (2 CPU workers x
    batch 2) into tmp_path/two; returns the workers' logs."""
    run(TrainConfig(pretrained_model_name_or_path=str(tiny_model), latent_store=str(tiny_store),
                    output_dir=str(tmp_path / "one"), train_batch_size=4, **flags))
    msrun = Path(sys.executable).parent / "msrun"
    args = [str(msrun), "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}", "--join=True",
            f"--log_dir={tmp_path / 'msrun-logs'}", train.__file__,
            "--pretrained_model_name_or_path", str(tiny_model), "--latent_store", str(tiny_store),
            "--output_dir", str(tmp_path / "two"), "--train_batch_size", "2", "--distributed",
            "--device_target", "CPU"]
    for key, value in flags.items():
        args += [f"--no_{key}"] if value is False else [f"--{key}", str(value)]
    # msrun starts workers with the `python` on PATH: make that this venv's.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "msrun-logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-2000:] + logs[-4000:]
    assert "rank 0/2" in logs and "rank 1/2" in logs
    return logs


def test_two_workers_equal_one_worker_with_double_batch(tiny_model, tiny_store, tmp_path, t2i_home):
    """msrun with 2 CPU workers x batch 2 ends with the same UNet as 1 worker x batch 4 (same samples, same noise)."""
    from safetensors.numpy import load_file

    one_and_two_workers(tiny_model, tiny_store, tmp_path, **COMMON)
    one = load_file(str(tmp_path / "one" / "unet" / "diffusion_pytorch_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))
    moved = max(np.abs(one[k] - base[k]).max() for k in one)
    assert moved > 1e-4
    for k in one:
        np.testing.assert_allclose(two[k], one[k], atol=moved * 1e-3, rtol=0, err_msg=k)
    # Only rank 0 writes: one set of checkpoints, one log.
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert len(read_log(tmp_path / "two" / "logs")) == 2


def test_lora_two_workers_equal_one_worker_with_double_batch(tiny_model, tiny_store, tmp_path, t2i_home):
    """--lora_rank under msrun: 2 CPU workers x batch 2 train the adapter to what 1 worker
    x batch 4 does, from the same initial adapter on every worker; only rank 0 writes. Op by op (--no_jit) and one
    checkpoint, to keep it cheap: the compiled LoRA step is checked against --no_jit in test_lora.py."""
    from safetensors.numpy import load_file

    flags = dict(COMMON, checkpointing_steps=2, lora_rank=4, lora_alpha=8.0, jit=False)
    one_and_two_workers(tiny_model, tiny_store, tmp_path, **flags)
    one = load_file(str(tmp_path / "one" / lora.WEIGHT_NAME))
    two = load_file(str(tmp_path / "two" / lora.WEIGHT_NAME))
    assert set(two) == set(one) and len(one) == 64
    moved = max(np.abs(v).max() for k, v in one.items() if ".lora_B." in k)  # B starts at zero
    assert moved > 1e-4
    for k in one:
        np.testing.assert_allclose(two[k], one[k], atol=moved * 1e-3, rtol=0, err_msg=k)
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-2"]
    assert len(read_log(tmp_path / "two" / "logs")) == 2


def test_buckets_two_workers_equal_one_worker_with_double_batch(tiny_model, bucket_store, tmp_path, t2i_home):
    """On a store of aspect buckets each global batch is of one bucket and split across the workers: 2 CPU workers x
    batch 2 take every step's gradient norm (of the global batch) and end with the UNet of 1 worker x batch 4, over
    steps that change bucket. Op by op (--no_jit): compiled, each of the 3 bucket shapes is a compile per worker."""
    from safetensors.numpy import load_file

    flags = dict(COMMON, max_train_steps=3, checkpointing_steps=3, jit=False)
    # The steps cover more than one bucket (which ones is a pure function of the seed and the store).
    buckets = Buckets.of(LatentStore.open(bucket_store))
    train_slots, _ = split_holdout(buckets.valid_slots(), flags["num_validation_samples"], flags["seed"])
    batches = StepBatches(buckets, buckets.split(train_slots), 4, flags["seed"])
    assert len({batches.at(s)[0] for s in range(flags["max_train_steps"])}) > 1
    one_and_two_workers(tiny_model, bucket_store, tmp_path, **flags)
    logs = {n: read_log(tmp_path / n / "logs")
            for n in ("one", "two")}
    assert [r["step"] for r in logs["two"]] == [1, 2, 3]
    np.testing.assert_allclose([r["grad_norm"] for r in logs["two"]], [r["grad_norm"] for r in logs["one"]],
                               rtol=1e-4)
    unet = "unet/diffusion_pytorch_model.safetensors"
    one, two = load_file(str(tmp_path / "one" / unet)), load_file(str(tmp_path / "two" / unet))
    base = load_file(str(tiny_model / unet))
    moved = max(np.abs(one[k] - base[k]).max() for k in one)
    assert moved > 1e-4
    for k in one:
        np.testing.assert_allclose(two[k], one[k], atol=moved * 1e-3, rtol=0, err_msg=k)
