"""One optimizer step's inputs, built on the host: the step's random draws and the UNet batch made from them.

Every random number of optimizer step s comes from np.random.default_rng([seed, s]) and is drawn for the whole global
batch, then sliced per worker and micro-batch, so a resumed run, a run with more accumulation steps or with more
workers sees exactly the same samples and noise.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from t2i.training import losses
from t2i.training.rows import pick_views


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


def make_batch(store_arrays, draws, scaling_factor, alphas_cumprod, config, prediction_type, empty_prompt=None):
    """Turn stored moments + text states into UNet inputs, target and per-sample loss weights (all NumPy); with
    caption dropout, the drawn samples get `empty_prompt`'s text states (the store's encoding of "") instead."""
    moments, text, counts = store_arrays
    n = len(moments)
    view = pick_views(draws["view"], moments.shape[1])
    caption = np.floor(draws["caption"] * counts).astype(np.int64)
    x0 = losses.sample_latents(moments[np.arange(n), view], draws["eps"], scaling_factor)
    noise = draws["noise"]
    if config.noise_offset:
        noise = losses.offset_noise(noise, draws["offset"], config.noise_offset)
    timesteps = draws["timesteps"]
    perturbed = noise + config.input_perturbation * draws["perturbation"] if config.input_perturbation else None
    noisy, tgt = losses.noisy_and_target(x0, noise, timesteps, alphas_cumprod, prediction_type, perturbed)
    if config.snr_gamma is None:
        weights = np.ones(n, np.float32)
    else:
        snr = losses.snr(timesteps, alphas_cumprod)
        weights = losses.min_snr_weights(snr, config.snr_gamma, prediction_type).astype(np.float32)
    states = text[np.arange(n), caption].astype(np.float32)
    if config.caption_dropout_probability:
        states[draws["drop_caption"]] = empty_prompt
    return noisy, timesteps.astype(np.int32), states, tgt, weights


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
