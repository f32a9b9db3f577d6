import json

import numpy as np
from click.testing import CliRunner

from t2i.demo.shapes import COLOURS, SHAPES, demo_data_cli
from t2i.demo.tiny import demo_words


def test_tiny_model_layout(tiny_model):
    index = json.loads((tiny_model / "model_index.json").read_text())
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert component in index
        assert (tiny_model / component).is_dir()
    assert (tiny_model / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    scheduler = json.loads((tiny_model / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["clip_sample"] is False


def test_unet_round_trips_through_from_pretrained(tiny_model):
    from mindone.diffusers import UNet2DConditionModel
    from safetensors.numpy import load_file

    saved = load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))
    unet = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet")
    loaded = {p.name: p.asnumpy() for p in unet.get_parameters()}
    assert set(saved) == set(loaded)
    for name, value in saved.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_tokenizer_knows_demo_words(tiny_model):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tiny_model), subfolder="tokenizer")
    for word in demo_words():
        ids = tok(word).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == 3, f"{word} should be one token, got {tok.convert_ids_to_tokens(ids)}"


def test_vae_latents_have_unit_variance_and_tight_posterior(tiny_model):
    import mindspore as ms
    from mindone.diffusers import AutoencoderKL

    from t2i.demo.shapes import demo_classes, render

    vae = AutoencoderKL.from_pretrained(str(tiny_model), subfolder="vae")
    rng = np.random.default_rng(1)
    images = np.stack([np.asarray(render(c, s, rng, 64), np.float32) for c, s in demo_classes()])
    moments = vae.encode(ms.Tensor(images.transpose(0, 3, 1, 2) / 127.5 - 1))[0].asnumpy()
    mean, logvar = np.split(moments, 2, axis=1)
    assert 0.5 < (mean * vae.config.scaling_factor).std() < 2.0
    assert logvar.max() < -10
    per_class = mean.reshape(len(images), -1)
    # Not colour-blind: images of different colours give different latents.
    assert np.linalg.norm(per_class[0] - per_class[len(SHAPES)]) > 0.1 * np.linalg.norm(per_class[0])


def test_demo_data_loads_as_imagefolder(demo_data):
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(demo_data), split="train")
    assert len(ds) == 24
    row = ds[0]
    colour, shape = row["text"].split()[1:]
    assert colour in COLOURS and shape in SHAPES
    pixel = np.asarray(row["image"].convert("RGB"), np.int32)
    # The caption's colour is the most common non-background colour in the image.
    fg = pixel[(np.abs(pixel - 245).sum(-1) > 30)]
    assert np.abs(fg.mean(0) - np.array(COLOURS[colour])).max() < 20


def test_demo_data_cli_is_deterministic(tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        result = runner.invoke(demo_data_cli, ["--output_dir", str(tmp_path / name), "--num_images", "5"])
        assert result.exit_code == 0, result.output
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    bad = runner.invoke(demo_data_cli, ["--output_dir", str(tmp_path / "c"), "--num_images", "0"])
    assert bad.exit_code != 0 and "--num_images" in bad.output
