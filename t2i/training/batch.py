"""One optimizer step's inputs, built on the host: the step's random draws and the UNet batch made from them.

Every random number of optimizer step s comes from np.random.default_rng([seed, s]) and is drawn for the whole global
batch, then sliced per worker and micro-batch, so a resumed run, a run with more accumulation steps or with more
workers sees exactly the same samples and noise.
"""

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from t2i.training import losses
from t2i.training.rows import pick_views


@dataclasses.dataclass(frozen=True)
class Diffusion:
    """The noising process the UNet is trained for: the base scheduler's schedule, the prediction type being trained
    and the VAE's latent scale."""

    alphas_cumprod: np.ndarray  # float64, one per training timestep
    prediction_type: str  # epsilon or v_prediction
    scaling_factor: float

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)


@dataclasses.dataclass
class Conditioning:
    """Everything the UNet is conditioned on besides the noisy latents and the timesteps, per sample: the text
    states and, for SDXL, the pooled text embedding and the size conditioning (its added_cond_kwargs text_embeds and
    time_ids). `arrays` is the order the train step takes them in after its fixed inputs."""

    states: np.ndarray  # (n, L, D)
    pooled: np.ndarray | None = None  # (n, P)
    time_ids: np.ndarray | None = None  # (n, 6): original (h, w), crop top-left (y, x), target (h, w)

    def arrays(self) -> tuple:
        return tuple(a for a in (self.states, self.pooled, self.time_ids) if a is not None)

    def rows(self, part) -> "Conditioning":
        return Conditioning(*(None if a is None else a[part] for a in (self.states, self.pooled, self.time_ids)))


@dataclasses.dataclass
class Batch:
    """The UNet's inputs, its target and the per-sample loss weights (NumPy), for n samples."""

    noisy: np.ndarray  # (n, C, h, w)
    timesteps: np.ndarray  # (n,) int32
    target: np.ndarray  # (n, C, h, w)
    weights: np.ndarray  # (n,) float32: 1, or the Min-SNR weight
    cond: Conditioning

    def rows(self, part) -> "Batch":
        """The samples `part` (a slice or indices) of the batch: one micro-batch."""
        return Batch(self.noisy[part], self.timesteps[part], self.target[part], self.weights[part],
                     self.cond.rows(part))

    def arrays(self) -> tuple:
        """The train step's positional inputs (t2i.training.step): noisy, timesteps, target, weights, *conditioning."""
        return (self.noisy, self.timesteps, self.target, self.weights, *self.cond.arrays())


def draw(rng, n, latent_shape, config, num_train_timesteps):
    """Every random number one optimizer step needs, for all n samples of the global batch, in a fixed order."""
    shape = (n,) + tuple(latent_shape)
    d = {
        "view": rng.random(n),
        "caption": rng.random(n),
        "eps": rng.standard_normal(shape, dtype=np.float32),
        "noise": rng.standard_normal(shape, dtype=np.float32),
        "timesteps": rng.integers(0, num_train_timesteps, n),
    }
    if config.noise_offset:
        d["offset"] = rng.standard_normal(shape[:2], dtype=np.float32)
    if config.input_perturbation:
        d["perturbation"] = rng.standard_normal(shape, dtype=np.float32)
    if config.caption_dropout_probability:
        d["drop_caption"] = rng.random(n) < config.caption_dropout_probability
    return d


def make_batch(rows, draws, diffusion: Diffusion, config, empty_prompt=None, empty_pooled=None) -> Batch:
    """Turn stored rows (t2i.data.store.Rows: moments, text states, caption counts; SDXL's pooled embeddings and
    time ids) into the UNet's batch; with caption dropout, the drawn samples get the store's empty-prompt
    conditioning (`empty_prompt`, SDXL's `empty_pooled`) instead."""
    moments, text, counts = rows.moments, rows.text, rows.counts
    n = len(moments)
    view = pick_views(draws["view"], moments.shape[1])
    caption = np.floor(draws["caption"] * counts).astype(np.int64)
    x0 = losses.sample_latents(moments[np.arange(n), view], draws["eps"], diffusion.scaling_factor)
    noise = draws["noise"]
    if config.noise_offset:
        noise = losses.offset_noise(noise, draws["offset"], config.noise_offset)
    timesteps = draws["timesteps"]
    perturbed = noise + config.input_perturbation * draws["perturbation"] if config.input_perturbation else None
    alphas, prediction = diffusion.alphas_cumprod, diffusion.prediction_type
    noisy, tgt = losses.noisy_and_target(x0, noise, timesteps, alphas, prediction, perturbed)
    if config.snr_gamma is None:
        weights = np.ones(n, np.float32)
    else:
        weights = losses.min_snr_weights(losses.snr(timesteps, alphas), config.snr_gamma, prediction).astype(np.float32)
    cond = Conditioning(text[np.arange(n), caption].astype(np.float32))
    if rows.pooled is not None:
        cond.pooled = rows.pooled[np.arange(n), caption].astype(np.float32)
        cond.time_ids = rows.time_ids[np.arange(n), view].astype(np.float32)
    if config.caption_dropout_probability:
        cond.states[draws["drop_caption"]] = empty_prompt
        if cond.pooled is not None:
            cond.pooled[draws["drop_caption"]] = empty_pooled
    return Batch(noisy, timesteps.astype(np.int32), tgt, weights, cond)


def rank_indices(rank, world, batch, accumulation):
    """Positions in the global batch that this worker trains on, micro-batch by micro-batch.

    The global batch is `accumulation` micro-batches of world x batch samples, each split by rank, so that one worker
    with batch 2b sees, in every micro-batch, exactly the samples two workers with batch b see together.
    """
    return np.concatenate([m * world * batch + rank * batch + np.arange(batch) for m in range(accumulation)])


def one_ahead(build, start, stop):
    """build(i) for i in range(start, stop), each built on a worker thread while the caller still uses the one before:
    the next step's store read and NumPy work overlap the device step (a batch read of 8 random rows of the tiny store
    took ~37 ms, ~8% of a compiled step). Each build(i) is a pure function of i, so the batches are the same as
    built in line; an exception in build surfaces from the iteration that asks for that batch."""
    with ThreadPoolExecutor(1, thread_name_prefix="t2i-batch") as pool:
        pending = pool.submit(build, start) if start < stop else None
        for i in range(start, stop):
            current = pending.result()
            pending = pool.submit(build, i + 1) if i + 1 < stop else None
            yield current
