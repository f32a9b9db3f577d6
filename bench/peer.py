"""Section 4 and `--sd15`, PyTorch side: `peer_main` runs in .venv-peer (`--peer`), so this module imports torch and
diffusers, never MindSpore; `attach_peer` starts it from the MindSpore run and adds its figures to the results."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import (
    DDIM_STEPS,
    LOOP_BATCH,
    LOOP_RESOLUTION,
    LOOP_STEPS,
    NUM_IMAGES,
    PEER_PYTHON,
    PIPELINE_RESOLUTIONS,
    PROMPT,
    ROOT,
    SD15_CLIP,
    SD15_LOOP_STEPS,
    SD15_LOOP_WARMUP,
    SD15_MODEL,
    SD15_RESOLUTION,
    SD15_UNET,
    SD15_VAE,
    TINY_CONFIGS,
    WORK,
)
from bench.loop import loop_model_dirs
from bench.sd15 import SD15_TRAIN_REPEATS, TRAIN_VARIANTS, activation_mb
from bench.timing import current_rss_mb, interleaved, loadavg, log, mem_available_gb, peak_rss_mb, summary

# PyTorch's SD-1.5 train step peaks at 15.6 GB RSS (anchors).
PEER_SD15_TRAIN_MIN_FREE_GB = 16.5


def _train_fns(unet, batch, latent, text_shape, torch):
    """(forward+backward, train step = forward+backward + clip + AdamW) on fixed random inputs, as MindSpore's."""
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn((batch, 4, latent, latent), generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    states = torch.randn((batch, *text_shape), generator=g)
    target = torch.randn((batch, 4, latent, latent), generator=g)
    weights = torch.ones(batch)

    def loss():
        pred = unet(noisy, timesteps, states).sample
        return (((pred - target) ** 2).mean(dim=(1, 2, 3)) * weights).mean()

    def fwd_bwd(_):
        loss().backward()
        opt.zero_grad(set_to_none=True)

    def step(_):
        loss().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return fwd_bwd, step


def peer_train_step(unet, batch, latent, text_shape, repeats, torch):
    fwd_bwd, step = _train_fns(unet, batch, latent, text_shape, torch)
    return summary(interleaved({"train_step_on_tensors": step, "unet_fwd_bwd": fwd_bwd}, repeats))


def peer_main(work, out_path, repeats, sd15):
    """The tiny-model figures, or with sd15 only the SD-1.5 ones (which need no tiny model)."""
    import diffusers
    import torch
    import transformers

    result = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
              "torch_threads": torch.get_num_threads(), "load_start": loadavg(), "repeats": repeats,
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if sd15:
        result["sd15"] = peer_sd15(torch, diffusers, transformers, repeats)
    else:
        result.update(peer_tiny(work, repeats, torch, diffusers))
    result["peak_rss_mb"] = peak_rss_mb()
    result["load_end"] = loadavg()
    Path(out_path).write_text(json.dumps(result, indent=2))
    print(f"wrote {out_path}")


def training_shapes(model, unet):
    """(the VAE's downsampling factor, the text states' shape) a t2i model folder trains with: the text length is the
    tokenizer's, as the store holds states padded to it."""
    vae_config = json.loads((model / "vae" / "config.json").read_text())
    length = json.loads((model / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"]
    return 2 ** (len(vae_config["block_out_channels"]) - 1), (length, unet.config.cross_attention_dim)


def peer_tiny(work, repeats, torch, diffusers):
    model = work / "tiny-model"
    if not (model / "model_index.json").is_file():
        sys.exit(f"{model} is missing: run `.venv/bin/python -m bench --prepare` (make bench-peer does) first")
    result = {"train_step": [], "pipeline": []}
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(model / "unet"))
    factor, text_shape = training_shapes(model, unet)
    for res, batch in TINY_CONFIGS:
        times = peer_train_step(unet, batch, res // factor, text_shape, repeats, torch)
        result["train_step"].append({"resolution": res, "batch": batch, "times": times})
    result["loop"] = [{"geometry": name, "batch": LOOP_BATCH, **peer_loop(folder, LOOP_BATCH, LOOP_STEPS, torch,
                                                                            diffusers)}
                      for name, folder in loop_model_dirs(work).items()]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for res in PIPELINE_RESOLUTIONS:
            runs = interleaved({"pipeline": lambda r: pipe(PROMPT, num_inference_steps=DDIM_STEPS, height=res,
                                                           width=res, output_type="np")}, repeats)
            result["pipeline"].append({"resolution": res, "ddim_steps": DDIM_STEPS, "times": summary(runs)})
    return result


def peer_loop(model, batch, steps, torch, diffusers, resolution=LOOP_RESOLUTION, warmup=3, checkpointing=False):
    """A plain PyTorch diffusers loop on cached latents held in memory, as a user writes one: each step draws a batch,
    noise and timesteps, adds the noise (DDPMScheduler), runs forward, MSE, backward, clip, AdamW and reads the loss.
    Its median step time after the first `warmup`, as the MindSpore loop's is taken."""
    import statistics

    unet = diffusers.UNet2DConditionModel.from_pretrained(str(model / "unet"))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    scheduler = diffusers.DDPMScheduler.from_pretrained(str(model), subfolder="scheduler")
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    factor, text_shape = training_shapes(model, unet)
    side = resolution // factor
    latents = torch.randn((NUM_IMAGES, 4, side, side), generator=g)
    states = torch.randn((NUM_IMAGES, *text_shape), generator=g)
    times = []
    for _ in range(steps):
        tick = time.perf_counter()
        pick = torch.randint(0, NUM_IMAGES, (batch,), generator=g)
        x0 = latents[pick]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        pred = unet(scheduler.add_noise(x0, noise, t), t, states[pick]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - tick)
    return {"loop_step_s": statistics.median(times[warmup:]), "runs_s": times}


def peer_sd15(torch, diffusers, transformers, repeats):
    """The forward figures here, then each train variant in a process of its own (peer_sd15_train)."""
    result = _peer_sd15_inference(torch, diffusers, transformers, repeats)
    free = mem_available_gb()
    if free < PEER_SD15_TRAIN_MIN_FREE_GB:
        result["train_step"] = f"skipped: {free:.1f} GB of memory within reach, PyTorch needs about 15.6 GB"
        return result
    result["train"] = {}
    for variant in TRAIN_VARIANTS:
        out = WORK / f"peer-sd15-{variant}.json"
        out.unlink(missing_ok=True)
        args = [sys.executable, "-m", "bench", "--peer", "--sd15", "--sd15-variant", variant, "--peer-out", str(out)]
        code = subprocess.run(args, cwd=ROOT).returncode
        r = result["train"][variant] = json.loads(out.read_text()) if code == 0 and out.is_file() else \
            {"error": f"exit {code} (e.g. killed for lack of memory)"}
        result["times"].update(r.get("times", {}))
        result["peak_rss_mb"] = max(result["peak_rss_mb"], r.get("peak_rss_mb", 0))
    if (SD15_MODEL / "model_index.json").is_file():  # the MindSpore side's loop row built it
        out = WORK / "peer-sd15-loop.json"
        out.unlink(missing_ok=True)
        args = [sys.executable, "-m", "bench", "--peer", "--sd15", "--sd15-variant", "loop", "--peer-out",
                str(out)]
        code = subprocess.run(args, cwd=ROOT).returncode
        result["loop"] = json.loads(out.read_text()) if code == 0 and out.is_file() else \
            {"error": f"exit {code} (e.g. killed for lack of memory)"}
    return result


def _peer_sd15_inference(torch, diffusers, transformers, repeats):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**SD15_UNET)
    vae = diffusers.AutoencoderKL(**SD15_VAE).eval()
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_CLIP)).eval()
    image = torch.rand((1, 3, SD15_RESOLUTION, SD15_RESOLUTION)) * 2 - 1
    ids = torch.randint(0, SD15_CLIP["vocab_size"], (1, 77))
    noisy, states = torch.randn((1, 4, 64, 64)), torch.randn((1, 77, 768))

    def encode(_):
        with torch.no_grad():
            vae.encode(image).latent_dist.mean
            clip(ids)[0]

    def forward(_):
        with torch.no_grad():
            unet(noisy, torch.tensor([500]), states).sample

    unet.eval()
    return {"times": summary(interleaved({"unet_forward": forward, "vae512_clip_encode": encode}, repeats)),
            "peak_rss_mb": peak_rss_mb()}


def peer_sd15_train(variant, out_path):
    """One TRAIN_VARIANTS entry with PyTorch diffusers, in a process of its own: the same steps, inputs, repeats and
    activation-memory rule as the MindSpore worker (bench.sd15.train_worker); or, for "loop", peer_loop on the
    SD-1.5 folder with checkpointing, as t2i-train's loop row runs."""
    import diffusers
    import torch

    if variant == "loop":
        result = {"load_start": loadavg(), "steps": SD15_LOOP_STEPS, "warmup": SD15_LOOP_WARMUP,
                  **peer_loop(SD15_MODEL, 1, SD15_LOOP_STEPS, torch, diffusers, SD15_RESOLUTION, SD15_LOOP_WARMUP,
                              checkpointing=True)}
        result.update(peak_rss_mb=peak_rss_mb(), load_end=loadavg())
        Path(out_path).write_text(json.dumps(result, indent=2))
        return
    spec = TRAIN_VARIANTS[variant]
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**SD15_UNET)
    if spec["checkpointing"]:
        unet.enable_gradient_checkpointing()
    fwd_bwd, step = _train_fns(unet, 1, 64, (77, 768), torch)
    built_mb = current_rss_mb()
    weights_mb = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20
    result = {"variant": variant, **spec, "load_start": loadavg(), "rss_after_build_mb": built_mb}
    result["times"] = summary(interleaved({variant: step if spec["optimizer"] else fwd_bwd}, SD15_TRAIN_REPEATS))
    result["peak_rss_mb"] = peak_rss_mb()
    result["activation_mb"] = activation_mb(result["peak_rss_mb"], built_mb, weights_mb, spec["optimizer"])
    result["load_end"] = loadavg()
    Path(out_path).write_text(json.dumps(result, indent=2))


def run_peer(repeats, sd15, out_path):
    """Run the PyTorch side in .venv-peer, now, so its figures come from the same run as MindSpore's."""
    try:
        subprocess.run([str(PEER_PYTHON), "-c", "import torch, diffusers"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    args = [str(PEER_PYTHON), "-m", "bench", "--peer", "--repeats", str(repeats), "--peer-out", str(out_path)]
    if sd15:
        args += ["--sd15", "--sd15_repeats", str(repeats)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(WORK / f"{out_path.stem}.log", "w") as f:
        subprocess.run(args, check=True, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return True


def attach_peer(results, peer_json, repeats, sd15):
    log("PyTorch peer")
    if run_peer(repeats, sd15, peer_json):
        results["peer"] = {**json.loads(peer_json.read_text()), "source": "measured in this run"}
    elif peer_json.is_file():
        peer = json.loads(peer_json.read_text())
        results["peer"] = {**peer, "source": f"from bench/{peer_json.name}, measured separately at "
                                             f"{peer['measured_at']} (load {peer['load_start'][0]}): no .venv-peer now"}
    else:
        log("no .venv-peer: run `make bench-peer` for the PyTorch comparison")
