"""Validation during training: the held-out loss of the weights being trained (with right and with shuffled
captions) and images of the validation prompts from the weights the output will hold (EMA when --use_ema)."""

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from t2i.interop import pipeline
from t2i.interop.prompts import pipeline_prompt_args
from t2i.training import losses

# Validation images are sampled with DPM-Solver++ (2M): good pictures in the few steps validation can afford.
VALIDATION_SCHEDULER = "dpm++"


@contextlib.contextmanager
def inference(unet, jit=False):
    """Eval mode without gradient recording, and with --jit the UNet's forward compiled (models.compiled).

    The train step marks the UNet set_grad(); a PyNative forward of such a cell records its graph for a backward
    that never comes, and that memory was not released (measured: +2.3 GB per validation pass of 16 latents at
    32x32)."""
    from t2i.interop import models

    unet.set_train(False)
    unet.set_grad(False)
    try:
        with models.compiled(unet) if jit else contextlib.nullcontext():
            yield
    finally:
        unet.set_grad(True)
        unet.set_train(True)


def validation_losses(unet, buckets, val_slots, diffusion, seed: int, jit: bool) -> dict:
    """Unweighted loss on the held-out samples (`val_slots` of t2i.training.buckets.Buckets) with noise and timesteps
    fixed by the seed (comparable across steps), and the same loss with every sample paired with the next held-out
    sample's caption: a model that uses the text should do worse on the second. With aspect buckets, one UNet call
    per bucket; the loss is the mean over samples."""
    import mindspore as ms

    if len(val_slots) == 0:
        return {"val_loss": None, "val_loss_shuffled": None}
    rng = np.random.default_rng([seed, 99])
    per_sample_t = 4
    groups = [(b, slots) for b, slots in enumerate(buckets.split(val_slots)) if len(slots)]
    reads = [buckets.read(b, slots) for b, slots in groups]
    def first(name):  # the first caption's (or view's) array of every held-out sample, once per timestep
        return np.repeat(np.concatenate([getattr(rows, name)[:, 0] for rows in reads]), per_sample_t,
                         axis=0).astype(np.float32)

    sdxl = reads[0].pooled is not None
    states = first("text")
    pooled = first("pooled") if sdxl else None
    # Shuffled over all held-out samples, so that a bucket of one sample gets another sample's caption too (the
    # caption's pooled embedding with it; the size conditioning stays the image's).
    shuffled = np.roll(states, per_sample_t, axis=0)
    captions_of = {"val_loss": (states, pooled),
                   "val_loss_shuffled": (shuffled, None if pooled is None else np.roll(pooled, per_sample_t, axis=0))}
    time_ids = first("time_ids") if sdxl else None
    n_t = diffusion.num_train_timesteps
    sums = {"val_loss": 0.0, "val_loss_shuffled": 0.0}
    start = 0
    with inference(unet, jit):
        for rows in reads:
            moments = np.repeat(rows.moments[:, 0], per_sample_t, axis=0)
            eps = rng.standard_normal((len(moments), moments.shape[1] // 2) + moments.shape[2:], dtype=np.float32)
            x0 = losses.sample_latents(moments, eps, diffusion.scaling_factor)
            noise = rng.standard_normal(x0.shape, dtype=np.float32)
            spread = np.arange(len(x0)) % per_sample_t + rng.random(len(x0))
            timesteps = (spread * n_t / per_sample_t).astype(np.int32)
            noisy, tgt = losses.noisy_and_target(x0, noise, timesteps, diffusion.alphas_cumprod,
                                                 diffusion.prediction_type)
            part = slice(start, start + len(x0))
            for key, (text, pooled_text) in captions_of.items():
                added = None if not sdxl else {"text_embeds": ms.Tensor(pooled_text[part]),
                                               "time_ids": ms.Tensor(time_ids[part])}
                pred = unet(ms.Tensor(noisy), ms.Tensor(timesteps), ms.Tensor(text[part]), added_cond_kwargs=added,
                            return_dict=False)[0]
                sums[key] += float(((pred.float().asnumpy() - tgt) ** 2).mean()) * len(x0)
            start += len(x0)
    return {key: total / start for key, total in sums.items()}


@dataclass
class ValidationImages:
    """Renders the validation prompts with the weights the output will hold (EMA when used) into one PNG grid per
    call, sampled with the prediction type being trained; the frozen parts load at the first call."""

    model_dir: Path
    prompts: tuple
    height: int
    width: int
    steps: int
    seed: int
    prediction_type: str
    out_dir: Path  # <output_dir>/validation
    variant: str | None = None
    jit: bool = False
    parts: dict | None = None  # VAE, text encoder, tokenizer

    def __call__(self, unet, ema, step: int) -> Path:
        from PIL import Image

        if self.parts is None:
            self.parts = pipeline.load_parts(self.model_dir, variant=self.variant)
        scheduler = pipeline.load_scheduler(self.model_dir, VALIDATION_SCHEDULER, self.prediction_type)
        pipe = pipeline.assemble(unet, scheduler, **self.parts)
        pipe.set_progress_bar_config(disable=True)
        with inference(unet, self.jit), pipeline.ema_weights(ema, unet.trainable_params()):
            images = [
                pipe(**pipeline_prompt_args(pipe, prompt, None), height=self.height, width=self.width,
                     num_inference_steps=self.steps, generator=np.random.default_rng(self.seed))[0][0]
                for prompt in self.prompts
            ]
        w, h = images[0].size
        grid = Image.new("RGB", (w * len(images), h), "white")
        for i, img in enumerate(images):
            grid.paste(img, (i * w, 0))
        path = Path(self.out_dir) / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return path
