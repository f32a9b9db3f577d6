"""`--sd15`, MindSpore side: the SD-1.5 geometry with random weights, in a worker process of its own."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from t2i.bench import ROOT, SD15_CLIP, SD15_RESOLUTION, SD15_UNET, SD15_VAE
from t2i.bench.timing import interleaved, loadavg, mem_available_gb, peak_rss_mb, summary

# MindSpore's SD-1.5 train step (fp32, AdamW) was OOM-killed at 24.0 GB RSS on the 24 GB bench machine; with less
# memory within reach it is not attempted, since the OOM killer might pick another process.
SD15_TRAIN_MIN_FREE_GB = 26.0
# An SD-1.5 train step is slow on 2 cores: one timed step of each kind after the warm-up.
SD15_TRAIN_REPEATS = 1


def sd15_worker(repeats, out_path):
    """SD-1.5 UNet forward, VAE(512)+CLIP-L encode and, when memory allows, the train step and a seed-style step."""
    import mindspore as ms
    from transformers import CLIPTextConfig

    from mindone.diffusers import AutoencoderKL, UNet2DConditionModel
    from mindone.transformers import CLIPTextModel
    from t2i import runtime
    from t2i.optim import build_adamw
    from t2i.step import build_train_step

    runtime.setup("CPU")
    ms.set_seed(0)
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
    noisy = ms.Tensor(rng.standard_normal((1, 4, 64, 64), dtype=np.float32))
    timesteps = ms.Tensor(np.array([500], np.int32))
    states = ms.Tensor(rng.standard_normal((1, 77, 768), dtype=np.float32))
    target = ms.Tensor(rng.standard_normal((1, 4, 64, 64), dtype=np.float32))
    weights = ms.Tensor(np.ones(1, np.float32))
    image = ms.Tensor(rng.uniform(-1, 1, (1, 3, SD15_RESOLUTION, SD15_RESOLUTION)).astype(np.float32))
    ids = ms.Tensor(rng.integers(0, SD15_CLIP["vocab_size"], (1, 77)).astype(np.int32))

    def encode(_):
        vae.encode(image)[0].asnumpy()
        clip(ids)[0].asnumpy()

    def forward(_):
        unet(noisy, timesteps, states)[0].asnumpy()

    unet.set_train(False)
    runs = interleaved({"unet_forward": forward, "vae512_clip_encode": encode}, repeats)
    result["times"] = summary(runs)
    result["peak_rss_mb_inference"] = result["peak_rss_mb"] = peak_rss_mb()
    result["load_end"] = loadavg()
    result["train_step"] = "did not finish"
    # Written now and again after each train variant: running out of memory there must not lose these figures.
    Path(out_path).write_text(json.dumps(result, indent=2))
    free = mem_available_gb()
    if free < SD15_TRAIN_MIN_FREE_GB:
        result["train_step"] = (f"skipped: {free:.1f} GB of memory within reach, the MindSpore SD-1.5 train step "
                                f"needs about {SD15_TRAIN_MIN_FREE_GB:.0f} GB")
        Path(out_path).write_text(json.dumps(result, indent=2))
        return
    unet.set_train(True)
    optimizer = build_adamw(unet.trainable_params(), 1e-5)
    step = build_train_step(unet, optimizer, None, 1.0, 1)
    inputs = (noisy, timesteps, states, target, weights)
    # One variant after the other rather than interleaved: the seed-style step needs the most memory (the VAE's
    # 512 px activations on top of the train step's), so the plain step is measured first in case it fails.
    variants = {"train_step_on_tensors": lambda r: step(*inputs)[0].asnumpy(),
                "seed_style_step": lambda r: (encode(r), step(*inputs)[0].asnumpy())}
    for name, fn in variants.items():
        try:
            result["times"].update(summary(interleaved({name: fn}, SD15_TRAIN_REPEATS)))
        except RuntimeError as e:
            reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            result["train_step"] = f"{name} failed at {peak_rss_mb() / 1024:.1f} GB peak RSS: {reason}"
            break
        else:
            if name == "seed_style_step":
                result["train_step"] = "measured"
        finally:
            result["peak_rss_mb"] = peak_rss_mb()
            result["load_end"] = loadavg()
            Path(out_path).write_text(json.dumps(result, indent=2))
    if "seed_style_step" in result["times"]:
        t = result["times"]
        result["ratio train_step / seed_style_step"] = (t["train_step_on_tensors"]["median_s"]
                                                        / t["seed_style_step"]["median_s"])
        Path(out_path).write_text(json.dumps(result, indent=2))


def bench_sd15(repeats, work):
    out = work / "sd15.json"
    out.unlink(missing_ok=True)
    args = [sys.executable, "-m", "t2i.bench", "--sd15-worker", str(out), "--repeats", str(repeats)]
    with open(work / "sd15.log", "w") as f:
        code = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if not out.is_file():
        return {"error": f"the SD-1.5 worker exited with {code}; see {work / 'sd15.log'}"}
    result = json.loads(out.read_text())
    if code != 0:
        result["train_step"] += f" (the worker exited with {code}, e.g. killed for lack of memory)"
    return result
