"""The host side of a training step: what make_batch hands the UNet, checked against the formulas."""

import threading
import types

import numpy as np
import pytest

from t2i.data.store import Rows
from t2i.training.batch import Diffusion, draw, make_batch, one_ahead, rank_indices
from t2i.training.rows import pick_views

ALPHAS = np.linspace(0.999, 0.01, 1000)
SHAPE = (4, 2, 2)


def cfg(**kw):
    base = dict(noise_offset=0.0, input_perturbation=0.0, snr_gamma=None, caption_dropout_probability=0.0)
    return types.SimpleNamespace(**{**base, **kw})


def store_arrays(n, views=2, captions=3, rng=None):
    rng = rng or np.random.default_rng(0)
    moments = rng.standard_normal((n, views, 2 * SHAPE[0]) + SHAPE[1:]).astype(np.float32)
    moments[:, :, SHAPE[0]:] = -40.0  # logvar clamped to -30: the drawn latent is the mean to ~3e-7
    text = rng.standard_normal((n, captions, 5, 3)).astype(np.float32)
    return Rows(moments, text, np.full(n, captions, np.int32))


def batch(config, prediction_type="epsilon", n=6, seed=1, views=2, captions=3):
    arrays = store_arrays(n, views, captions)
    draws = draw(np.random.default_rng(seed), n, SHAPE, config, len(ALPHAS))
    return arrays, draws, make_batch(arrays, draws, Diffusion(ALPHAS, prediction_type, 0.5), config)


def clean_latents(arrays, draws):
    moments = arrays.moments
    view = pick_views(draws["view"], moments.shape[1])
    return moments[np.arange(len(moments)), view, : SHAPE[0]] * 0.5


def test_noise_offset_shifts_each_channel_of_the_noise_and_the_target():
    arrays, draws, b = batch(cfg(noise_offset=0.1))
    noisy, t, target = b.noisy, b.timesteps, b.target
    noise = draws["noise"] + 0.1 * draws["offset"][:, :, None, None]
    np.testing.assert_allclose(target, noise, rtol=1e-6)
    a = ALPHAS[t].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(noisy, np.sqrt(a) * clean_latents(arrays, draws) + np.sqrt(1 - a) * noise, atol=1e-5)
    assert np.abs(target - draws["noise"]).max() > 1e-3


def test_input_perturbation_enters_the_input_only():
    arrays, draws, b = batch(cfg(input_perturbation=0.1))
    noisy, t, target = b.noisy, b.timesteps, b.target
    np.testing.assert_allclose(target, draws["noise"], rtol=1e-6)  # the target is the unperturbed noise
    a = ALPHAS[t].reshape(-1, 1, 1, 1)
    perturbed = draws["noise"] + 0.1 * draws["perturbation"]
    np.testing.assert_allclose(noisy, np.sqrt(a) * clean_latents(arrays, draws) + np.sqrt(1 - a) * perturbed,
                               atol=1e-5)


def test_v_prediction_target_and_min_snr_weight_reach_the_batch():
    arrays, draws, b = batch(cfg(snr_gamma=5.0), "v_prediction")
    t, target, weights = b.timesteps, b.target, b.weights
    a = ALPHAS[t].reshape(-1, 1, 1, 1)
    x0 = clean_latents(arrays, draws)
    np.testing.assert_allclose(target, np.sqrt(a) * draws["noise"] - np.sqrt(1 - a) * x0, atol=1e-5)
    snr = ALPHAS[t] / (1 - ALPHAS[t])
    np.testing.assert_allclose(weights, np.minimum(snr, 5.0) / (snr + 1), rtol=1e-6)
    eps_weights = batch(cfg(snr_gamma=5.0), "epsilon")[2].weights
    np.testing.assert_allclose(eps_weights, np.minimum(snr, 5.0) / snr, rtol=1e-6)
    plain = batch(cfg(), "v_prediction")[2].weights
    np.testing.assert_array_equal(plain, np.ones(len(t), np.float32))


def test_caption_and_flip_choices_are_uniform():
    """Over many samples each of 3 captions is picked ~1/3 of the time, the flipped view ~1/2, and each of 6 views
    (3 crops x flip) ~1/6."""
    n = 6000
    arrays, draws, b = batch(cfg(), n=n)
    states = b.cond.states
    text = arrays.text
    picked = np.array([np.flatnonzero((text[i] == states[i]).all(axis=(1, 2)))[0] for i in range(n)])
    np.testing.assert_allclose(np.bincount(picked, minlength=3) / n, [1 / 3] * 3, atol=0.025)
    np.testing.assert_allclose(pick_views(draws["view"], 2).mean(), 0.5, atol=0.025)
    np.testing.assert_allclose(np.bincount(pick_views(draws["view"], 6), minlength=6) / n, [1 / 6] * 6, atol=0.02)
    # A sample with one caption always gets it, whatever the draw.
    one = batch(cfg(), n=50, captions=1)[2].cond.states
    np.testing.assert_array_equal(one, store_arrays(50, captions=1).text[:, 0])


def test_rank_indices_partition_the_global_batch():
    world, size, acc = 3, 2, 2
    parts = [rank_indices(r, world, size, acc) for r in range(world)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(world * size * acc))
    # Micro-batch m of every rank together is micro-batch m of one worker with batch world x size.
    first = np.concatenate([p[:size] for p in parts])
    np.testing.assert_array_equal(np.sort(first), np.arange(world * size))


def test_caption_dropout_swaps_in_the_empty_prompt_and_leaves_every_other_draw():
    """--caption_dropout_probability p: each sample's text states become the empty prompt's with probability p (drawn
    from the step's generator, so resume stays exact); noise, timesteps, views and the other samples' captions are
    those of a run without dropout."""
    n, p = 400, 0.3
    empty = np.full((5, 3), 7.0, np.float32)
    arrays = store_arrays(n)
    plain_draws = draw(np.random.default_rng(4), n, SHAPE, cfg(), len(ALPHAS))
    diffusion = Diffusion(ALPHAS, "epsilon", 0.5)
    plain = make_batch(arrays, plain_draws, diffusion, cfg())
    drop_draws = draw(np.random.default_rng(4), n, SHAPE, cfg(caption_dropout_probability=p), len(ALPHAS))
    dropped = make_batch(arrays, drop_draws, diffusion, cfg(caption_dropout_probability=p), empty)
    for name in ("noisy", "timesteps", "target", "weights"):
        np.testing.assert_array_equal(getattr(dropped, name), getattr(plain, name))
    is_empty = (dropped.cond.states == empty).all(axis=(1, 2))
    np.testing.assert_array_equal(dropped.cond.states[~is_empty], plain.cond.states[~is_empty])
    assert not (plain.cond.states == empty).all(axis=(1, 2)).any()
    # 400 draws of p = 0.3: 120 expected, standard deviation 9.2
    assert 120 - 4 * 9.2 < is_empty.sum() < 120 + 4 * 9.2


# one_ahead: the training loop's batches, each built on a worker thread while the caller uses the one before.


def test_one_ahead_yields_each_build_in_order():

    assert list(one_ahead(lambda i: ("batch", i), 3, 7)) == [("batch", 3), ("batch", 4), ("batch", 5), ("batch", 6)]


def test_one_ahead_builds_the_next_item_while_the_caller_holds_the_current():
    """build(1) starts on another thread as soon as item 0 is handed out, and is still running (held on `release`)
    while the caller holds item 0: the next batch's host work overlaps the caller's step."""


    started = [threading.Event() for _ in range(3)]
    release = [threading.Event() for _ in range(3)]
    finished = [threading.Event() for _ in range(3)]
    threads = {}

    def build(i):
        threads[i] = threading.current_thread()
        started[i].set()
        if i > 0:
            assert release[i].wait(5)
        finished[i].set()
        return i

    items = one_ahead(build, 0, 3)
    assert next(items) == 0
    # The caller has not asked for item 1, yet its build has begun, and is still in progress.
    assert started[1].wait(1), "build(1) did not start while the caller held item 0"
    assert not finished[1].is_set() and not started[2].is_set()
    assert threads[1] is not threading.current_thread()
    release[1].set()
    assert next(items) == 1
    assert started[2].wait(1), "build(2) did not start while the caller held item 1"
    release[2].set()
    assert list(items) == [2]


def test_one_ahead_raises_a_build_error_from_the_iteration_that_asks_for_it():
    """build(2) fails while the caller holds item 1 (built one ahead): item 1 is still delivered, and the error comes
    from the iteration asking for item 2."""


    def build(i):
        if i == 2:
            raise ValueError("store read failed for 2")
        return i

    items = one_ahead(build, 0, 5)
    assert next(items) == 0
    assert next(items) == 1
    with pytest.raises(ValueError, match="store read failed for 2"):
        next(items)


def test_one_ahead_of_an_empty_range_builds_and_yields_nothing():

    calls = []

    def build(i):
        calls.append(i)
        return i

    assert list(one_ahead(build, 4, 4)) == []
    assert calls == []
