"""The tiny VAE learns to draw (t2i.demo.tiny_vae), and the model folder records how (t2i_tiny.json)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from t2i.demo.tiny import TinyGeometry, _tame_vae, tiny_model_cli
from t2i.demo.tiny_vae import VaeRecipe, demo_like_images, reconstruction_error, train_vae


def random_vae():
    import mindspore as ms
    from mindone.diffusers import AutoencoderKL

    ms.set_seed(0)
    g = TinyGeometry()
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=g.vae_channels,
                         layers_per_block=1, latent_channels=4, norm_num_groups=g.norm_groups, sample_size=32)


@pytest.fixture(scope="module")
def held_out():
    return demo_like_images(16, 32, 64, np.random.default_rng(7))


def test_training_lowers_the_reconstruction_error(held_out):
    vae = random_vae()
    before = reconstruction_error(vae, held_out)
    report = train_vae(vae, VaeRecipe(steps=20, batch_size=4, num_images=64))
    after = reconstruction_error(vae, held_out)
    assert after < 0.5 * before, (before, after)
    assert report["recipe"]["steps"] == 20 and report["train_mse_last"] < report["train_mse_first"]


def test_whitening_keeps_what_the_decoder_draws(held_out):
    """_tame_vae(whiten=True) decorrelates the latents to unit variance; post_quant_conv takes the transform back, so
    the reconstructions stay as they were."""
    import mindspore as ms

    vae = random_vae()
    train_vae(vae, VaeRecipe(steps=3, batch_size=4, num_images=16))
    before = reconstruction_error(vae, held_out)
    _tame_vae(vae, held_out, whiten=True)
    assert reconstruction_error(vae, held_out) == pytest.approx(before, rel=1e-3)
    mean = vae.encode(ms.Tensor(held_out))[0].asnumpy()[:, :4] * vae.config.scaling_factor
    np.testing.assert_allclose(np.cov(mean.transpose(1, 0, 2, 3).reshape(4, -1)), np.eye(4), atol=0.02)


def test_cli_trains_the_vae_and_records_the_recipe(tmp_path):
    out = tmp_path / "model"
    result = CliRunner().invoke(tiny_model_cli, ["--output_dir", str(out), "--resolution", "32",
                                                 "--vae_train_steps", "2", "--device_target", "CPU"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "t2i_tiny.json").read_text())["vae_training"]
    assert record["recipe"]["steps"] == 2 and record["recipe"]["resolution"] == 32
    assert 0 < record["reconstruction_mse"] and 0 < record["blank_image_mse"]
    assert (out / "model_index.json").is_file()


def test_cli_refuses_a_negative_step_count(tmp_path):
    result = CliRunner().invoke(tiny_model_cli, ["--output_dir", str(tmp_path / "m"), "--vae_train_steps", "-1"])
    assert result.exit_code != 0 and "--vae_train_steps" in result.output
    assert not (tmp_path / "m").exists()
