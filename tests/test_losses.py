import numpy as np
import pytest

from t2i.training import losses


def test_min_snr_weights_epsilon_and_v_by_hand():
    snr = np.array([1.0, 4.0, 10.0])
    np.testing.assert_allclose(losses.min_snr_weights(snr, 5.0, "epsilon"), [1.0, 1.0, 0.5])
    np.testing.assert_allclose(losses.min_snr_weights(snr, 5.0, "v_prediction"), [0.5, 0.8, 5.0 / 11.0])
    with pytest.raises(ValueError, match="prediction type"):
        losses.min_snr_weights(snr, 5.0, "sample")


def test_snr_from_alphas_cumprod_by_hand_and_matches_mindone():
    import mindspore as ms
    from mindone.diffusers import DDPMScheduler
    from mindone.diffusers.training_utils import compute_snr

    alphas = np.array([0.8, 0.5, 0.2])
    np.testing.assert_allclose(losses.snr(np.array([0, 1, 2]), alphas), [4.0, 1.0, 0.25])
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = np.array([0, 10, 500, 999])
    ours = losses.snr(t, sched.alphas_cumprod.asnumpy())
    np.testing.assert_allclose(ours, compute_snr(sched, ms.Tensor(t)).asnumpy(), rtol=1e-4)


def test_add_noise_and_velocity_by_hand():
    alphas = np.array([0.25, 0.64])
    x0 = np.full((2, 1, 1, 1), 2.0)
    noise = np.full((2, 1, 1, 1), 4.0)
    t = np.array([0, 1])
    # sqrt(.25)*2 + sqrt(.75)*4 and sqrt(.64)*2 + sqrt(.36)*4
    np.testing.assert_allclose(losses.add_noise(x0, noise, t, alphas).ravel(), [1 + np.sqrt(0.75) * 4, 1.6 + 2.4], rtol=1e-6)
    np.testing.assert_allclose(losses.velocity(x0, noise, t, alphas).ravel(), [2 - np.sqrt(0.75) * 2, 3.2 - 1.2], rtol=1e-6)
    np.testing.assert_array_equal(losses.target(x0, noise, t, alphas, "epsilon"), noise)


def test_add_noise_matches_mindone_scheduler():
    import mindspore as ms
    from mindone.diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 3, 4, 4, 4), dtype=np.float32)
    t = np.array([3, 700, 999])
    ref = sched.add_noise(ms.Tensor(x0), ms.Tensor(noise), ms.Tensor(t)).asnumpy()
    np.testing.assert_allclose(losses.add_noise(x0, noise, t, sched.alphas_cumprod.asnumpy()), ref, atol=1e-5)
    ref_v = sched.get_velocity(ms.Tensor(x0), ms.Tensor(noise), ms.Tensor(t)).asnumpy()
    np.testing.assert_allclose(losses.velocity(x0, noise, t, sched.alphas_cumprod.asnumpy()), ref_v, atol=1e-5)


def test_sample_latents_uses_mean_logvar_and_scale():
    mean = np.array([1.0, -2.0]).reshape(1, 2, 1, 1)
    logvar = np.log(np.array([4.0, 0.25])).reshape(1, 2, 1, 1)
    eps = np.array([0.5, 2.0]).reshape(1, 2, 1, 1)
    z = losses.sample_latents(np.concatenate([mean, logvar], 1), eps, 0.5)
    # (mean + std * eps) * scale with std = 2 and 0.5
    np.testing.assert_allclose(z.ravel(), [(1 + 2 * 0.5) * 0.5, (-2 + 0.5 * 2) * 0.5])


def test_offset_noise_is_per_sample_per_channel_constant():
    noise = np.zeros((2, 3, 4, 4))
    draw = np.arange(6.0).reshape(2, 3)
    out = losses.offset_noise(noise, draw, 0.1)
    np.testing.assert_allclose(out[1, 2], np.full((4, 4), 0.5))
    np.testing.assert_allclose(out[0, 1], np.full((4, 4), 0.1))
