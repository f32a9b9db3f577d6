"""The diffusion training objective as small pure NumPy functions (minRF style), kept apart from the loop.

They run on the host: per step they touch only the batch's latents (e.g. 8x4x64x64 at SD-1.5 size), and keeping
them out of the device graph leaves the device with exactly the UNet forward/backward and a weighted MSE.
"""

import numpy as np


def sample_latents(moments, eps, scaling_factor):
    """Draw z ~ N(mean, exp(logvar)) from VAE moments (mean ‖ logvar on axis 1) and scale as the UNet expects.

    logvar is clamped to [-30, 20] as in diffusers' DiagonalGaussianDistribution.
    """
    mean, logvar = np.split(moments.astype(np.float32), 2, axis=1)
    std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
    return (mean + std * eps) * scaling_factor


def add_noise(x0, noise, timesteps, alphas_cumprod):
    """Forward diffusion q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) noise, a_t = alphas_cumprod[t]."""
    a = alphas_cumprod[timesteps].astype(np.float32).reshape(-1, 1, 1, 1)
    return np.sqrt(a) * x0 + np.sqrt(1.0 - a) * noise


def velocity(x0, noise, timesteps, alphas_cumprod):
    """v-prediction target: sqrt(a_t) noise - sqrt(1 - a_t) x_0."""
    a = alphas_cumprod[timesteps].astype(np.float32).reshape(-1, 1, 1, 1)
    return np.sqrt(a) * noise - np.sqrt(1.0 - a) * x0


def target(x0, noise, timesteps, alphas_cumprod, prediction_type):
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, timesteps, alphas_cumprod)
    raise ValueError(f"unknown prediction type {prediction_type!r}; use epsilon or v_prediction")


def snr(timesteps, alphas_cumprod):
    """Signal-to-noise ratio (alpha_t / sigma_t)^2 = a_t / (1 - a_t)."""
    a = alphas_cumprod[timesteps].astype(np.float64)
    return a / (1.0 - a)


def min_snr_weights(snr_values, gamma, prediction_type):
    """Min-SNR-gamma loss weights (Hang et al. 2023) exactly as the seed script applies them.

    epsilon: min(snr, gamma) / snr;  v_prediction: min(snr, gamma) / (snr + 1).
    """
    clipped = np.minimum(snr_values, gamma)
    if prediction_type == "epsilon":
        return clipped / snr_values
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    raise ValueError(f"unknown prediction type {prediction_type!r}; use epsilon or v_prediction")


def offset_noise(noise, offset_draw, noise_offset):
    """Noise offset (Guttenberg 2023): a per-sample, per-channel constant added to the noise."""
    return noise + noise_offset * offset_draw.reshape(noise.shape[0], noise.shape[1], 1, 1)


def noisy_and_target(x0, noise, timesteps, alphas_cumprod, prediction_type, input_noise=None):
    """The UNet's input and regression target for clean latents x0: (x_t, target) as float32.

    input_noise: the noise that goes into x_t when it differs from the one the target is made of (input
    perturbation, Ning et al. 2023); by default both are `noise`.
    """
    noisy = add_noise(x0, noise if input_noise is None else input_noise, timesteps, alphas_cumprod)
    return noisy.astype(np.float32), target(x0, noise, timesteps, alphas_cumprod, prediction_type).astype(np.float32)
