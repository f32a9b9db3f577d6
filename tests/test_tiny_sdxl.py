"""The tiny SDXL pipeline (t2i.demo.tiny.build_tiny_sdxl_model) is a real SDXL folder: mindone's
StableDiffusionXLPipeline loads every weight of it and samples, PyTorch diffusers' loads it with no key missing or
unexpected and computes what mindone computes (UNet output on the same inputs, prompt embeddings), and
`t2i-tiny-model --family sdxl` writes it.

The PyTorch side runs in .venv-peer (torch, diffusers, transformers), which `make peer` builds, as
tests/test_output_pipeline.py's does; its script is PEER_SCRIPT below.
"""

import json
import os
import subprocess
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import load_file

from t2i.interop.models import pytorch_names

PEER_PYTHON = Path(__file__).resolve().parent.parent / ".venv-peer" / "bin" / "python"
SIZE = 32
PROMPT = "a red circle"
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}

# Run by .venv-peer's Python (no MindSpore, no t2i): load FOLDER as a PyTorch user would, report each weighted
# component's missing and unexpected keys, sample 2 steps, and save the UNet's output on INPUTS and the prompt's
# embeddings to OUTPUT.
PEER_SCRIPT = r"""
import json, sys
import numpy as np, torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

folder, inputs, output, prompt, size = sys.argv[1:]
pipe = StableDiffusionXLPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
keys = {}
for name, cls in {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                  "text_encoder_2": CLIPTextModelWithProjection}.items():
    _, info = cls.from_pretrained(folder, subfolder=name, output_loading_info=True)
    keys[name] = {"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"])}
x = {k: torch.from_numpy(v) for k, v in np.load(inputs).items()}
with torch.no_grad():
    noise = pipe.unet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                      added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}).sample
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
image = pipe(prompt, num_inference_steps=2, height=int(size), width=int(size), output_type="np",
             generator=torch.Generator().manual_seed(0)).images
np.savez(output, noise=noise.numpy(), prompt_embeds=embeds.numpy(), pooled_prompt_embeds=pooled.numpy())
components = {name: type(part).__name__ for name, part in pipe.components.items() if part is not None}
print(json.dumps({"keys": keys, "components": components, "image_shape": list(image.shape),
                  "image_finite": bool(np.isfinite(image).all())}))
"""


def mindone_pipeline(folder):
    from mindone.diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_close(got, want, name, rel=1e-4):
    """max |got - want| within `rel` of max |want| (elementwise relative error is meaningless near zero)."""
    assert got.shape == want.shape, name
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= rel, f"{name}: max difference {err:.2e} of the largest value"


def test_mindone_loads_every_weight_and_samples_with_guidance(tiny_sdxl_model):
    folder = tiny_sdxl_model
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    pipe = mindone_pipeline(folder)
    # Every parameter is the file's (mindone would only warn about a missing one and leave it random), whichever
    # names the file uses: this side loads MindSpore names too; the PyTorch test below requires PyTorch's.
    for name, weights in WEIGHTS.items():
        model, state = getattr(pipe, name), load_file(str(folder / name / weights))
        names = pytorch_names(model)
        for ms_name, param in model.parameters_and_names():
            want = state.get(names[ms_name], state.get(ms_name))
            assert want is not None, f"{name}: {names[ms_name]} is not in {weights}"
            np.testing.assert_array_equal(param.asnumpy(), want, err_msg=f"{name}: {ms_name}")
    # The two encoders are told apart by width; the UNet cross-attends to both and takes text_time conditioning.
    assert (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size) == (32, 48)
    assert pipe.text_encoder_2.config.projection_dim == 32
    unet = pipe.unet.config
    assert (unet.addition_embed_type, unet.cross_attention_dim, unet.projection_class_embeddings_input_dim) == (
        "text_time", 80, 6 * unet.addition_time_embed_dim + 32)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    scheduler = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end, scheduler.num_train_timesteps) == (
        "scaled_linear", 0.00085, 0.012, 1000)
    assert (scheduler.prediction_type, scheduler.timestep_spacing, scheduler.steps_offset) == ("epsilon", "leading", 1)
    image = pipe(PROMPT, num_inference_steps=2, height=SIZE, width=SIZE, guidance_scale=5.0, output_type="np",
                 generator=np.random.default_rng(0))[0]
    assert image.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(image).all()


def test_pytorch_diffusers_loads_it_and_computes_what_mindone_computes(tiny_sdxl_model, tmp_path):
    if not PEER_PYTHON.is_file():
        pytest.skip(f"{PEER_PYTHON} does not exist: run `make peer` to build the PyTorch diffusers venv")
    folder = tiny_sdxl_model
    rng = np.random.default_rng(0)
    latent = SIZE // 2  # the tiny VAE downsamples by 2
    inputs = {
        "sample": rng.standard_normal((2, 4, latent, latent)).astype(np.float32),
        "timestep": np.array([999, 10], np.int64),
        "encoder_hidden_states": rng.standard_normal((2, 8, 80)).astype(np.float32),
        "text_embeds": rng.standard_normal((2, 32)).astype(np.float32),
        # original size, crop top-left, target size: SDXL's micro-conditioning
        "time_ids": np.array([[SIZE, SIZE, 0, 0, SIZE, SIZE], [64, 48, 8, 0, SIZE, SIZE]], np.float32),
    }
    np.savez(tmp_path / "inputs.npz", **inputs)
    done = subprocess.run(
        [str(PEER_PYTHON), "-c", PEER_SCRIPT, str(folder), str(tmp_path / "inputs.npz"), str(tmp_path / "peer.npz"),
         PROMPT, str(SIZE)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    assert done.returncode == 0, f"PyTorch diffusers cannot load {folder}: {last}"
    peer = json.loads(done.stdout.strip().splitlines()[-1])
    assert peer["keys"] == {name: {"missing": [], "unexpected": []} for name in WEIGHTS}
    assert peer["components"]["text_encoder_2"] == "CLIPTextModelWithProjection"
    assert peer["image_shape"] == [1, SIZE, SIZE, 3] and peer["image_finite"]
    torch_out = np.load(tmp_path / "peer.npz")

    pipe = mindone_pipeline(folder)
    noise = pipe.unet(ms.Tensor(inputs["sample"]), ms.Tensor(inputs["timestep"]),
                      encoder_hidden_states=ms.Tensor(inputs["encoder_hidden_states"]),
                      added_cond_kwargs={"text_embeds": ms.Tensor(inputs["text_embeds"]),
                                         "time_ids": ms.Tensor(inputs["time_ids"])}, return_dict=False)[0]
    assert_close(noise.asnumpy(), torch_out["noise"], "UNet output")
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    assert embeds.shape == (1, 8, 80)  # both encoders' penultimate hidden states, concatenated
    assert_close(embeds.asnumpy(), torch_out["prompt_embeds"], "prompt_embeds")
    assert_close(pooled.asnumpy(), torch_out["pooled_prompt_embeds"], "pooled_prompt_embeds")


def test_tiny_model_command_writes_the_sdxl_folder(tiny_sdxl_model, tmp_path):
    from click.testing import CliRunner

    from t2i.demo.tiny import tiny_model_cli

    out = tmp_path / "sdxl"
    result = CliRunner().invoke(tiny_model_cli, ["--output_dir", str(out), "--family", "sdxl",
                                                 "--vae_train_steps", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    record = json.loads((out / "t2i_tiny.json").read_text())
    assert record.get("family") == "sdxl" and record["vae_training"] is None
    # Same geometry (64 px), seed 0 and a random VAE: the fixture's folder, byte for byte.
    written = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    assert written == sorted(str(f.relative_to(tiny_sdxl_model)) for f in tiny_sdxl_model.rglob("*") if f.is_file())
    for name in written:
        assert (out / name).read_bytes() == (tiny_sdxl_model / name).read_bytes(), name
