"""Teach the tiny VAE to draw: a short autoencoder training on images made like the demo data.

A random decoder turns any latent into noise, so before this every picture the demo wrote was noise whatever the UNet
learned. This trains the whole AutoencoderKL on rendered demo-like images (a fresh random draw of colour, shape, size
and position each time, bilinearly resized as precompute resizes, randomly flipped) with the usual objective:
reconstruction MSE of a latent sampled from the posterior, plus a small KL to the unit Gaussian. t2i.demo.tiny then tames
it (near-deterministic posterior, whitened latents: see `_tame_vae`).

The forward+backward is one compiled graph (ms.jit), as t2i-train's UNet step is: 0.51 s per step of 8 at 32 px on the
2-core CPU against 1.34 s op by op (PyNative), after ~16 s of compiling. The recipe (120 steps, lr 3e-3 after 5 steps
of warm-up) takes about 80 s with the compile. Fewer steps left colour unlearned: the decoder drew every colour but
yellow as the same dark blue (100 steps with a cosine decay, in one of two initialisations; 150 steps at 2e-3 read
56% of colours right), while this recipe reads 100% and 96% of the reconstructions' colours right in two
initialisations (t2i.demo.learning's measure on 96 held-out images; MSE 0.073 and 0.079).
"""

import time
from dataclasses import asdict, dataclass

import numpy as np

# Shorter runs (the tests') stay op by op: the ~16 s compile pays for itself after about 20 steps.
COMPILE_FROM_STEPS = 30


@dataclass(frozen=True)
class VaeRecipe:
    steps: int = 120
    batch_size: int = 8
    learning_rate: float = 3e-3
    lr_scheduler: str = "constant_with_warmup"  # mindone.diffusers.optimization.get_scheduler's names
    lr_warmup_steps: int = 5
    kl_weight: float = 1e-3  # per latent element, against the per-pixel MSE
    resolution: int = 32  # the demo trains at 32 px; the decoder is convolutional and draws at other sizes too
    render_size: int = 64  # rendered at the demo data's size, then resized to `resolution`
    num_images: int = 1200  # pool of rendered images the batches are drawn from
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"--vae_train_steps must be 0 or more, got {self.steps}")
        if self.batch_size < 1 or self.num_images < self.batch_size:
            raise ValueError(f"VAE training needs 1 <= batch_size <= num_images, got {self.batch_size}, "
                             f"{self.num_images}")
        if self.resolution % 8:
            raise ValueError(f"VAE training resolution must be a multiple of 8, got {self.resolution}")


def demo_like_images(n, resolution, render_size, rng) -> np.ndarray:
    """n images of random demo classes as the VAE sees them: (n, 3, resolution, resolution) in [-1, 1]."""
    from PIL import Image

    from t2i.demo.shapes import demo_classes, render

    classes = demo_classes()
    picks = rng.integers(len(classes), size=n)
    images = [render(*classes[k], rng, render_size).resize((resolution, resolution), Image.BILINEAR) for k in picks]
    return np.stack([np.asarray(img, np.float32) for img in images]).transpose(0, 3, 1, 2) / 127.5 - 1.0


def reconstruction_error(vae, images, batch_size=32) -> float:
    """Mean squared error (images in [-1, 1]) of decoding the posterior mean, as precompute's near-deterministic
    latents are decoded."""
    import mindspore as ms

    latent = vae.config.latent_channels
    errors = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        mean = vae.encode(ms.Tensor(x))[0][:, :latent]
        errors.append(((vae.decode(mean)[0].asnumpy() - x) ** 2).mean(axis=(1, 2, 3)))
    return float(np.concatenate(errors).mean())


def train_vae(vae, recipe: VaeRecipe) -> dict:
    """Train `vae` in place; returns the recipe, the losses and the time taken."""
    import mindspore as ms
    from mindone.diffusers.optimization import get_scheduler
    from mindspore import ops
    from tqdm import tqdm

    from t2i.training.optim import build_adamw

    rng = np.random.default_rng(recipe.seed)
    pool = demo_like_images(recipe.num_images, recipe.resolution, recipe.render_size, rng)
    latent = vae.config.latent_channels
    params = vae.trainable_params()
    schedule = get_scheduler(recipe.lr_scheduler, lr=recipe.learning_rate, num_warmup_steps=recipe.lr_warmup_steps,
                             num_training_steps=max(recipe.steps, 1))
    optimizer = build_adamw(params, schedule, weight_decay=0.0)

    def loss_fn(x, eps):
        moments = vae.encode(x)[0]
        mean, logvar = moments[:, :latent], ops.clamp(moments[:, latent:], -30.0, 20.0)
        recon = vae.decode(mean + ops.exp(0.5 * logvar) * eps)[0]
        mse = ((recon - x) ** 2).mean()
        kl = 0.5 * (mean**2 + ops.exp(logvar) - 1.0 - logvar).mean()
        return mse + recipe.kl_weight * kl, mse

    grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters, has_aux=True)
    if recipe.steps >= COMPILE_FROM_STEPS:
        grad_fn = ms.jit(grad_fn)
    vae.set_train(True)
    start = time.perf_counter()
    losses = []
    side = recipe.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    bar = tqdm(total=recipe.steps, desc="train the tiny VAE", unit="step")
    for _ in range(recipe.steps):
        x = pool[rng.choice(len(pool), recipe.batch_size, replace=False)]
        flip = rng.random(len(x)) < 0.5
        x[flip] = x[flip][..., ::-1]
        eps = rng.standard_normal((len(x), latent, side, side), dtype=np.float32)
        (_, mse), grads = grad_fn(ms.Tensor(x), ms.Tensor(eps))
        optimizer(grads)
        losses.append(float(mse))
        bar.update()
        bar.set_postfix(mse=f"{losses[-1]:.4f}")
    bar.close()
    vae.set_train(False)
    return {"recipe": asdict(recipe), "seconds": round(time.perf_counter() - start, 1),
            "train_mse_first": losses[0] if losses else None, "train_mse_last": losses[-1] if losses else None}


def vae_quality(vae, recipe: VaeRecipe, n=96) -> dict:
    """The trained VAE on n held-out images: its reconstruction MSE, and for scale the MSE of drawing nothing (a
    plain background)."""
    from t2i.demo.shapes import BACKGROUND

    images = demo_like_images(n, recipe.resolution, recipe.render_size, np.random.default_rng([recipe.seed, 1]))
    blank = np.array(BACKGROUND, np.float32)[:, None, None] / 127.5 - 1.0
    return {"reconstruction_mse": round(reconstruction_error(vae, images), 5),
            "blank_image_mse": round(float(((images - blank) ** 2).mean()), 5), "held_out_images": n}
