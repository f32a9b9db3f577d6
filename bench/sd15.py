"""`--sd15`, MindSpore side: the SD-1.5 geometry with random weights, in a worker process of its own."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import (
    ROOT,
    SD15_CLIP,
    SD15_LOOP_IMAGES,
    SD15_LOOP_STEPS,
    SD15_LOOP_WARMUP,
    SD15_MODEL,
    SD15_RESOLUTION,
    SD15_UNET,
    SD15_VAE,
)
from bench.timing import current_rss_mb, interleaved, loadavg, log, mem_available_gb, peak_rss_mb, summary

# One timed SD-1.5 train step after the warm-up: each takes a minute or more of both cores.
SD15_TRAIN_REPEATS = 1
# Each train variant runs in a process of its own, so each peak RSS is that variant's alone. The train step runs op by
# op with gradient checkpointing: the compiled step's forward+backward alone peaked at 17.3 GB (op by op: 10.7 GB),
# which with the optimizer's 6.9 GB of moments does not fit in 24 GB.
TRAIN_VARIANTS = {
    "train_step_on_tensors": {"checkpointing": True, "optimizer": True},
    "unet_fwd_bwd_checkpointing": {"checkpointing": True, "optimizer": False},
    "unet_fwd_bwd": {"checkpointing": False, "optimizer": False},
}
# MindSpore only: `t2i-train --lora_rank 4 --gradient_checkpointing`'s step with `--mixed_precision fp16` (the frozen
# base in fp16, the adapter and its AdamW state in fp32) and with `no` (everything in fp32).
LORA_VARIANTS = {"lora_train_step_fp16": {"checkpointing": True, "optimizer": True, "lora_rank": 4, "half": True},
                 "lora_train_step_fp32": {"checkpointing": True, "optimizer": True, "lora_rank": 4, "half": False}}
MINDSPORE_VARIANTS = {**TRAIN_VARIANTS, **LORA_VARIANTS}


def activation_mb(peak_mb, built_mb, weights_mb, optimizer):
    """What a train variant's peak holds beyond its model: peak RSS - RSS after building the UNet and the optimizer
    (weights, runtime) - the gradients - the AdamW moments when it steps. One rule for MindSpore and PyTorch."""
    return peak_mb - built_mb - weights_mb - (2 * weights_mb if optimizer else 0.0)


def _inputs(rng):
    import mindspore as ms

    noisy = ms.Tensor(rng.standard_normal((1, 4, 64, 64), dtype=np.float32))
    timesteps = ms.Tensor(np.array([500], np.int32))
    states = ms.Tensor(rng.standard_normal((1, 77, 768), dtype=np.float32))
    target = ms.Tensor(rng.standard_normal((1, 4, 64, 64), dtype=np.float32))
    return noisy, timesteps, states, target, ms.Tensor(np.ones(1, np.float32))


def _write(result, out_path):
    Path(out_path).write_text(json.dumps(result, indent=2))


def inference_worker(repeats, out_path):
    """SD-1.5 UNet forward and VAE(512)+CLIP-L encode."""
    import mindspore as ms
    from mindone.diffusers import AutoencoderKL, UNet2DConditionModel
    from mindone.transformers import CLIPTextModel
    from transformers import CLIPTextConfig

    rng = np.random.default_rng(0)
    result = {"repeats": repeats, "mem_within_reach_gb_at_start": round(mem_available_gb(), 1),
              "load_start": loadavg()}
    tick = time.perf_counter()
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD15_VAE)
    clip = CLIPTextModel(CLIPTextConfig(**SD15_CLIP))
    clip.set_train(False)
    result["build_s"] = time.perf_counter() - tick
    result["unet_params_m"] = sum(p.size for p in unet.trainable_params()) / 1e6
    noisy, timesteps, states, _, _ = _inputs(rng)
    image = ms.Tensor(rng.uniform(-1, 1, (1, 3, SD15_RESOLUTION, SD15_RESOLUTION)).astype(np.float32))
    ids = ms.Tensor(rng.integers(0, SD15_CLIP["vocab_size"], (1, 77)).astype(np.int32))

    def encode(_):
        vae.encode(image)[0].asnumpy()
        clip(ids)[0].asnumpy()

    def forward(_):
        unet(noisy, timesteps, states)[0].asnumpy()

    unet.set_train(False)
    result["times"] = summary(interleaved({"unet_forward": forward, "vae512_clip_encode": encode}, repeats))
    result["peak_rss_mb"] = peak_rss_mb()
    result["load_end"] = loadavg()
    _write(result, out_path)


def train_worker(variant, out_path):
    """One TRAIN_VARIANTS entry: a warm-up and SD15_TRAIN_REPEATS timed runs of the train step or the UNet's
    forward+backward, op by op; its peak RSS, and the activation memory: peak RSS - RSS after building the UNet and
    the optimizer (weights, runtime) - the gradients - the optimizer's moments (when it steps)."""
    import mindspore as ms
    from mindone.diffusers import UNet2DConditionModel

    from t2i.interop.lora import DEFAULT_TARGETS, add_adapters
    from t2i.interop.models import enable_gradient_checkpointing
    from t2i.training.optim import build_adamw
    from t2i.training.step import build_train_step, mixed_precision

    spec = MINDSPORE_VARIANTS[variant]
    ms.set_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    if spec.get("lora_rank"):
        add_adapters(unet, spec["lora_rank"], float(spec["lora_rank"]), DEFAULT_TARGETS, 0.0)
    if spec["checkpointing"]:
        enable_gradient_checkpointing(unet)
    unet.set_train(True)
    step_net, loss_scaler = mixed_precision(unet, ms.float16 if spec.get("half") else ms.float32,
                                            lora=bool(spec.get("lora_rank")))
    step = build_train_step(step_net, build_adamw(unet.trainable_params(), 1e-5, jit=False), loss_scaler, 1.0, 1,
                            jit=False)
    built_mb = current_rss_mb()
    inputs = _inputs(np.random.default_rng(0))
    # What trains: its gradients and AdamW moments (the frozen base is in built_mb).
    weights_mb = sum(p.nbytes for p in unet.trainable_params()) / 2**20
    if spec["optimizer"]:
        def run(_):
            step(*inputs)[0].asnumpy()
    else:
        def run(_):
            step.forward_and_backward(*inputs)[0][0].asnumpy()
    result = {"variant": variant, **spec, "load_start": loadavg(), "rss_after_build_mb": built_mb}
    result["times"] = summary(interleaved({variant: run}, SD15_TRAIN_REPEATS))
    result["peak_rss_mb"] = peak_rss_mb()
    result["activation_mb"] = activation_mb(result["peak_rss_mb"], built_mb, weights_mb, spec["optimizer"])
    result["load_end"] = loadavg()
    _write(result, out_path)


def sd15_worker(repeats, out_path, variant):
    from t2i.core import runtime

    runtime.setup("CPU")
    if variant == "inference":
        inference_worker(repeats, out_path)
    else:
        train_worker(variant, out_path)


def _run_worker(repeats, work, variant):
    out = work / f"sd15-{variant}.json"
    out.unlink(missing_ok=True)
    args = [sys.executable, "-m", "bench", "--sd15-worker", str(out), "--sd15-variant", variant,
            "--repeats", str(repeats)]
    with open(work / f"sd15-{variant}.log", "w") as f:
        code = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0 or not out.is_file():
        return {"error": f"exit {code} (e.g. killed for lack of memory); see {work / f'sd15-{variant}.log'}"}
    return json.loads(out.read_text())


def bench_sd15_loop(work):
    """`t2i-train` on SD-1.5 as the smoke runs it: SD15_LOOP_IMAGES demo images at 512 px encoded by t2i-precompute,
    then SD15_LOOP_STEPS steps; its median step after the warm-up and its peak RSS."""
    from bench.memory import train_subprocess
    from bench.sd15_model import ensure_sd15_model
    from bench.smoke import TRAIN_FLAGS, run_stage

    ensure_sd15_model(SD15_MODEL)
    data, store = work / "sd15-loop-data", work / "sd15-loop-latents.zarr"
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    run_stage("demo data", ["t2i-demo-data", "--output_dir", str(data), "--num_images", str(SD15_LOOP_IMAGES),
                            "--resolution", str(SD15_RESOLUTION)], work / "sd15-loop-data.log")
    run_stage("precompute", ["t2i-precompute", "--pretrained_model_name_or_path", str(SD15_MODEL), "--train_data_dir",
                             str(data), "--output_dir", str(store), "--resolution", str(SD15_RESOLUTION),
                             "--center_crop", "--batch_size", "1"], work / "sd15-loop-precompute.log")
    loop = train_subprocess(SD15_MODEL, store, work / "sd15-loop", SD15_LOOP_STEPS, 1, TRAIN_FLAGS,
                            warmup=SD15_LOOP_WARMUP, validation_samples=0)
    return {"steps": SD15_LOOP_STEPS, "warmup": SD15_LOOP_WARMUP, "flags": list(TRAIN_FLAGS),
            "loop_step_s": loop["median_step_s"], "loop_peak_rss_mb": loop["peak_rss_mb"], "load": loadavg()}


def bench_sd15(repeats, work):
    """The inference figures, then each train variant in a process of its own, then t2i-train's loop."""
    result = _run_worker(repeats, work, "inference")
    if "error" in result:
        return result
    result["train"] = {}
    for variant in MINDSPORE_VARIANTS:
        log(f"SD-1.5 {variant}")
        r = result["train"][variant] = _run_worker(repeats, work, variant)
        if "times" in r:
            result["times"].update(r["times"])
        result["peak_rss_mb"] = max(result["peak_rss_mb"], r.get("peak_rss_mb", 0))
    log("SD-1.5 t2i-train loop")
    result["loop"] = bench_sd15_loop(work)
    return result
