"""SDXL through the same two stages, on the tiny SDXL pipeline (conftest.tiny_sdxl_model): the store holds what
mindone's own StableDiffusionXLPipeline encodes (both encoders' states, the pooled embedding), each view's size
conditioning locates its crop as diffusers' SDXL script does, the empty prompt follows force_zeros_for_empty_prompt,
training is exact across resume and compiled alike, and the output folder and a LoRA of it load in PyTorch diffusers.
"""

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from t2i import infer
from t2i.data.encode import time_ids
from t2i.data.images import crops, resized_size
from t2i.data.store import LatentStore, Rows
from t2i.demo.shapes import make_demo_data
from t2i.precompute import PrecomputeConfig
from t2i.precompute import run as precompute
from t2i.train import TrainConfig
from t2i.train import run as train
from t2i.training.batch import Diffusion, draw, make_batch

PEER_PYTHON = Path(__file__).resolve().parent.parent / ".venv-peer" / "bin" / "python"


@pytest.fixture(scope="module")
def sdxl_data(tmp_path_factory):
    """12 demo images, half square (48x48) and half 1.5:1 (56x40), so random crops move along the long side."""
    return make_demo_data(tmp_path_factory.mktemp("sdxl-data") / "data", num_images=24, size=48,
                          aspect_ratios=(1.0, 1.5))


def store_config(model, data, out, **kw):
    return PrecomputeConfig(pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(out),
                            resolution=32, random_flip=True, **kw)


@pytest.fixture(scope="module")
def sdxl_store(tiny_sdxl_model, sdxl_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl-store") / "latents.zarr"
    precompute(store_config(tiny_sdxl_model, sdxl_data, path))
    return path


def train_config(model, store, out, **kw):
    base = dict(pretrained_model_name_or_path=str(model), latent_store=str(store), output_dir=str(out),
                train_batch_size=4, max_train_steps=4, checkpointing_steps=2, report_to="none", num_validation_samples=4,
                learning_rate=1e-3, lr_warmup_steps=0, snr_gamma=5.0, caption_dropout_probability=0.25, jit=False)
    return TrainConfig(**{**base, **kw})


def test_store_holds_what_mindones_sdxl_pipeline_encodes(tiny_sdxl_model, sdxl_data, sdxl_store):
    from mindone.diffusers import StableDiffusionXLPipeline

    store = LatentStore.open(sdxl_store)
    assert store.sdxl and store.attrs["schema_version"] == 3 and store.attrs["text_shape"] == [8, 80]
    assert "family: sdxl" in store.describe()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model))
    captions = {json.loads(line)["file_name"]: json.loads(line)["text"]
                for line in (sdxl_data / "metadata.jsonl").read_text().splitlines()}
    index = store.index()
    for name in sorted(captions)[:3]:
        rows = store.read([index[name][0]])
        embeds, _, pooled, _ = pipe.encode_prompt(captions[name], do_classifier_free_guidance=False)
        # The store keeps fp16: within its rounding of the pipeline's own encoding.
        np.testing.assert_allclose(rows.text[0, 0], embeds.asnumpy()[0], rtol=0, atol=2e-3)
        np.testing.assert_allclose(rows.pooled[0, 0], pooled.asnumpy()[0], rtol=0, atol=2e-3)
    # force_zeros_for_empty_prompt (the tiny model's, as SDXL base's): the empty prompt's conditioning is zeros.
    assert not store.empty_prompt().any() and not store.empty_pooled().any()


def test_empty_prompt_is_the_encoding_of_nothing_without_force_zeros(tiny_sdxl_model, sdxl_data, tmp_path):
    from mindone.diffusers import StableDiffusionXLPipeline

    model = tmp_path / "model"
    shutil.copytree(tiny_sdxl_model, model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    store_path = tmp_path / "s.zarr"
    precompute(store_config(model, sdxl_data, store_path, max_train_samples=2))
    store = LatentStore.open(store_path)
    embeds, _, pooled, _ = StableDiffusionXLPipeline.from_pretrained(str(model)).encode_prompt(
        "", do_classifier_free_guidance=False)
    np.testing.assert_allclose(store.empty_prompt(), embeds.asnumpy()[0], rtol=0, atol=2e-3)
    np.testing.assert_allclose(store.empty_pooled(), pooled.asnumpy()[0], rtol=0, atol=2e-3)
    assert np.abs(store.empty_pooled()).max() > 0.01


def test_time_ids_locate_each_view_in_the_resized_image():
    """A random crop of a 1.5:1 image and its mirror image: the time ids name the original size, the crop's top-left
    in the resized image (the flipped view's in the mirrored resized image, which is where diffusers' SDXL script
    takes it: flip, then crop) and the target size."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    views = crops(img, 32, False, 2, random.Random(3))
    ids = time_ids(img.size, 32, [corner for _, corner in views], random_flip=True)
    resized = img.resize(resized_size(img.size, 32), Image.BILINEAR)
    assert resized.size == (48, 32) and ids.shape == (4, 6)
    mirrored = resized.transpose(Image.FLIP_LEFT_RIGHT)
    for c, (crop, _) in enumerate(views):
        plain, flipped = ids[2 * c], ids[2 * c + 1]
        assert list(plain[:2]) == [40, 60] and list(plain[4:]) == [32, 32] and list(flipped[4:]) == [32, 32]
        top, left = plain[2:4]
        np.testing.assert_array_equal(np.asarray(resized.crop((left, top, left + 32, top + 32))), np.asarray(crop))
        top, left = flipped[2:4]
        np.testing.assert_array_equal(np.asarray(mirrored.crop((left, top, left + 32, top + 32))),
                                      np.asarray(crop.transpose(Image.FLIP_LEFT_RIGHT)))
    assert len({tuple(v[2:4]) for v in ids}) > 1  # the crops did move
    # An aspect bucket's target is its own size.
    assert list(time_ids((60, 40), (48, 32), [(0, 0)], random_flip=False)[0]) == [40, 60, 0, 0, 32, 48]


def test_stored_time_ids_are_each_samples_own(sdxl_data, sdxl_store):
    store = LatentStore.open(sdxl_store)
    rows = store.read(store.valid_slots())
    assert rows.time_ids.shape[1:] == (2, 6)
    originals = {tuple(v) for v in rows.time_ids[:, 0, :2]}
    assert originals == {(48, 48), (40, 56)}  # (h, w) of the square and of the 1.5:1 images
    assert (rows.time_ids[:, :, 4:] == 32).all()
    wide = rows.time_ids[:, 0, 0] == 40
    # A 56x40 image resized to 44x32: its crop's left edge in 0..12, and the flipped view's is 12 - left.
    np.testing.assert_array_equal(rows.time_ids[wide, 1, 3], 12 - rows.time_ids[wide, 0, 3])


def test_batch_takes_each_samples_caption_pooled_and_view_time_ids():
    import types

    n, views, captions = 64, 2, 3
    rng = np.random.default_rng(0)
    rows = Rows(moments=rng.standard_normal((n, views, 8, 2, 2)).astype(np.float32),
                text=rng.standard_normal((n, captions, 5, 6)).astype(np.float32),
                counts=np.full(n, captions, np.int32),
                pooled=rng.standard_normal((n, captions, 4)).astype(np.float32),
                time_ids=rng.integers(0, 99, (n, views, 6)).astype(np.int32))
    config = types.SimpleNamespace(noise_offset=0.0, input_perturbation=0.0, snr_gamma=None,
                                   caption_dropout_probability=0.3)
    draws = draw(np.random.default_rng(1), n, (4, 2, 2), config, 1000)
    empty, empty_pooled = np.full((5, 6), 9.0, np.float32), np.full(4, 7.0, np.float32)
    batch = make_batch(rows, draws, Diffusion(np.linspace(0.99, 0.01, 1000), "epsilon", 1.0), config, empty,
                       empty_pooled)
    cond = batch.cond
    view = np.floor(draws["view"] * views).astype(int)
    caption = np.floor(draws["caption"] * captions).astype(int)
    dropped = draws["drop_caption"]
    assert 0 < dropped.sum() < n
    np.testing.assert_array_equal(cond.time_ids, rows.time_ids[np.arange(n), view])  # the image's, dropped or not
    np.testing.assert_array_equal(cond.pooled[~dropped], rows.pooled[np.arange(n), caption][~dropped])
    np.testing.assert_array_equal(cond.states[~dropped], rows.text[np.arange(n), caption][~dropped])
    assert (cond.pooled[dropped] == 7.0).all() and (cond.states[dropped] == 9.0).all()
    # The train step's inputs: the fixed four, then states, pooled, time ids.
    assert [a.shape for a in batch.arrays()[4:]] == [(n, 5, 6), (n, 4), (n, 6)]


@pytest.mark.slow
def test_sdxl_training_resumes_exactly_and_compiles_to_the_same_weights(tiny_sdxl_model, sdxl_store, tmp_path,
                                                                          t2i_home):
    straight = train(train_config(tiny_sdxl_model, sdxl_store, tmp_path / "straight"))
    train(train_config(tiny_sdxl_model, sdxl_store, tmp_path / "split", max_train_steps=2))
    resumed = train(train_config(tiny_sdxl_model, sdxl_store, tmp_path / "split", resume_from_checkpoint="latest"))
    assert resumed["start_step"] == 2
    np.testing.assert_allclose([h["loss"] for h in resumed["history"]],
                               [h["loss"] for h in straight["history"][2:]], rtol=1e-6)
    weights = "unet/diffusion_pytorch_model.safetensors"
    want = load_file(str(tmp_path / "straight" / weights))
    for name, got in load_file(str(tmp_path / "split" / weights)).items():
        np.testing.assert_allclose(got, want[name], rtol=0, atol=1e-6, err_msg=name)
    compiled = train(train_config(tiny_sdxl_model, sdxl_store, tmp_path / "jit", jit=True))
    np.testing.assert_allclose([h["loss"] for h in compiled["history"]], [h["loss"] for h in straight["history"]],
                               rtol=1e-4)
    assert np.isfinite(straight["val_loss"]) and straight["val_loss_shuffled"] is not None


def test_an_sd_store_and_an_sdxl_model_are_refused_together(tiny_sdxl_model, tiny_store, tmp_path, t2i_home):
    with pytest.raises(ValueError, match="different VAE/text encoder|is an SD 1.x/2.x store"):
        train(train_config(tiny_sdxl_model, tiny_store, tmp_path / "o"))
    assert not (tmp_path / "o").exists()


# Run by .venv-peer's Python: the trained folder and the LoRA, loaded as a PyTorch user would; prints the keys each
# component lacked or did not expect and the UNet's output on INPUTS without and with the LoRA.
PEER_SCRIPT = r"""
import json, sys
import numpy as np, torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModelWithProjection

full, base, lora, inputs, output = sys.argv[1:]
keys = {}
for name, cls in {"unet": UNet2DConditionModel, "text_encoder_2": CLIPTextModelWithProjection}.items():
    _, info = cls.from_pretrained(full, subfolder=name, output_loading_info=True)
    keys[name] = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"])
x = {k: torch.from_numpy(v) for k, v in np.load(inputs).items()}
def unet_out(pipe):
    with torch.no_grad():
        return pipe.unet(x["sample"], x["timestep"], encoder_hidden_states=x["states"],
                         added_cond_kwargs={"text_embeds": x["pooled"], "time_ids": x["time_ids"]}).sample.numpy()
full_out = unet_out(StableDiffusionXLPipeline.from_pretrained(full))
pipe = StableDiffusionXLPipeline.from_pretrained(base)
pipe.load_lora_weights(lora, weight_name="pytorch_lora_weights.safetensors")
np.savez(output, full=full_out, lora=unet_out(pipe))
print(json.dumps(keys))
"""


@pytest.mark.slow
def test_the_output_and_a_lora_sample_and_load_in_pytorch_diffusers(tiny_sdxl_model, sdxl_store, tmp_path,
                                                                     t2i_home):
    import mindspore as ms

    from t2i.interop import lora as lora_files
    from t2i.interop import models

    full, adapter = tmp_path / "full", tmp_path / "lora"
    train(train_config(tiny_sdxl_model, sdxl_store, full, use_ema=True, validation_steps=4,
                       validation_prompts=("a red circle",), validation_inference_steps=2))
    train(train_config(tiny_sdxl_model, sdxl_store, adapter, lora_rank=4, learning_rate=1e-2))
    assert (full / "validation" / "step-000004.png").is_file()
    assert "StableDiffusionXLPipeline.from_pretrained" in (full / "README.md").read_text()
    assert json.loads((full / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    written = infer.run(infer.InferConfig(prompt=("a red circle",), model=str(full), output=str(tmp_path / "a.png"),
                                          num_inference_steps=3, height=32, width=32, scheduler="dpm++",
                                          negative_prompt="blue"))
    written += infer.run(infer.InferConfig(prompt=("a red circle",), model=str(tiny_sdxl_model),
                                           lora=(f"{adapter}:0.8",), output=str(tmp_path / "b.png"),
                                           num_inference_steps=3, height=32, width=32))
    assert all(np.asarray(Image.open(p)).shape == (32, 32, 3) for p in written)
    if not PEER_PYTHON.is_file():
        pytest.skip(f"{PEER_PYTHON} does not exist: run `make peer` to build the PyTorch diffusers venv")
    rng = np.random.default_rng(0)
    inputs = {"sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32), "timestep": np.array([900, 20]),
              "states": rng.standard_normal((2, 8, 80)).astype(np.float32),
              "pooled": rng.standard_normal((2, 32)).astype(np.float32),
              "time_ids": np.array([[40, 56, 0, 6, 32, 32], [48, 48, 0, 0, 32, 32]], np.float32)}
    np.savez(tmp_path / "inputs.npz", **inputs)
    done = subprocess.run([str(PEER_PYTHON), "-c", PEER_SCRIPT, str(full), str(tiny_sdxl_model), str(adapter),
                           str(tmp_path / "inputs.npz"), str(tmp_path / "peer.npz")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"unet": [], "text_encoder_2": []}
    peer = np.load(tmp_path / "peer.npz")

    def mindone_out(unet):
        return unet(ms.Tensor(inputs["sample"]), ms.Tensor(inputs["timestep"]), ms.Tensor(inputs["states"]),
                    added_cond_kwargs={"text_embeds": ms.Tensor(inputs["pooled"]),
                                       "time_ids": ms.Tensor(inputs["time_ids"])}, return_dict=False)[0].asnumpy()

    want = mindone_out(models.load_unet(full))
    np.testing.assert_allclose(peer["full"], want, rtol=0, atol=1e-4 * np.abs(want).max())
    base = models.load_unet(tiny_sdxl_model)
    plain = mindone_out(base)
    lora_files.apply(base, [(adapter, 1.0)])
    with_lora = mindone_out(base)
    assert np.abs(with_lora - plain).max() > 1e-4 * np.abs(plain).max()  # the adapter moved the output
    np.testing.assert_allclose(peer["lora"], with_lora, rtol=0, atol=1e-4 * np.abs(with_lora).max())


def test_prompt_weighting_reads_both_encoders_and_the_pooled_embedding(tiny_sdxl_model):
    """t2i-infer's prompt arguments for SDXL: an unweighted prompt gives the pipeline's own encode_prompt bit for bit
    (states of both encoders and the pooled embedding), a weight changes the states, a long prompt takes a second
    chunk of both encoders and keeps the first chunk's pooled embedding, and without a negative prompt the pipeline's
    zeros (force_zeros_for_empty_prompt) stay the unconditional branch."""
    from mindone.diffusers import StableDiffusionXLPipeline

    from t2i.interop.prompts import pipeline_prompt_args

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model))

    def own(prompt):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        return embeds.asnumpy(), pooled.asnumpy()

    args = pipeline_prompt_args(pipe, "a red circle", None)
    assert set(args) == {"prompt_embeds", "pooled_prompt_embeds"}
    embeds, pooled = own("a red circle")
    np.testing.assert_array_equal(args["prompt_embeds"].asnumpy(), embeds)
    np.testing.assert_array_equal(args["pooled_prompt_embeds"].asnumpy(), pooled)
    weighted = pipeline_prompt_args(pipe, "a (red:1.5) circle", None)["prompt_embeds"].asnumpy()
    assert np.abs(weighted - embeds).max() > 1e-3
    negative = pipeline_prompt_args(pipe, "a red circle", "blue")
    np.testing.assert_array_equal(negative["negative_prompt_embeds"].asnumpy(), own("blue")[0])
    np.testing.assert_array_equal(negative["negative_pooled_prompt_embeds"].asnumpy(), own("blue")[1])
    # 6 tokens a chunk (the tiny tokenizers' 8 less BOS and EOS): 9 words take two chunks of both encoders.
    long = pipeline_prompt_args(pipe, "a red circle a green square a blue triangle", None)
    assert long["prompt_embeds"].shape == (1, 16, 80)
    np.testing.assert_array_equal(long["pooled_prompt_embeds"].asnumpy(), own("a red circle a green square")[1])


def test_aspect_buckets_store_each_buckets_target_size_and_train(tiny_sdxl_model, sdxl_data, tmp_path, t2i_home):
    """With --aspect_buckets each bucket's store is SDXL's too, and its views' time ids name that bucket's size as the
    target; a step trains on a bucket's batch with them."""
    path = tmp_path / "b.zarr"
    precompute(store_config(tiny_sdxl_model, sdxl_data, path, aspect_buckets=True, bucket_step=8,
                            max_aspect_ratio=2.0))
    store = LatentStore.open(path)
    parts = store.parts()
    assert store.sdxl and len(parts) == 2
    for (width, height), part in parts:
        rows = part.read(part.valid_slots())
        assert part.sdxl and rows.pooled is not None
        assert (rows.time_ids[:, :, 4] == height).all() and (rows.time_ids[:, :, 5] == width).all()
    result = train(train_config(tiny_sdxl_model, path, tmp_path / "o", train_batch_size=2, max_train_steps=2,
                                num_validation_samples=2))
    assert [h["step"] for h in result["history"]] == [1, 2] and np.isfinite(result["val_loss"])
