"""t2i-train's output folder is a complete pipeline for a base laid out like SD-1.5 (safety checker and feature
extractor included), and mindone's and PyTorch diffusers' plain `StableDiffusionPipeline.from_pretrained` load it and
sample, whatever names the base's weights were saved under.

The PyTorch side is tests/peer_load.py, run in .venv-peer (torch, diffusers, transformers), which `make test` builds.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from t2i.interop import models, pipeline
from t2i.train import TrainConfig, run

PEER = Path(__file__).resolve().parent.parent / ".venv-peer"
PEER_SCRIPT = Path(__file__).with_name("peer_load.py")
TORCH_KEYS = json.loads((Path(__file__).parent / "data" / "torch_keys.json").read_text())
SIZE = 32
WEIGHTED = ("text_encoder", "unet", "vae", "safety_checker")
NO_KEY_PROBLEMS = {name: {"missing": [], "unexpected": []} for name in WEIGHTED}


def tiny_safety_checker():
    """mindone's SD safety checker on a tiny CLIP vision tower that sees SIZE-pixel images."""
    from mindone.diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=64, max_position_embeddings=8),
                        vision_config=dict(small, image_size=SIZE, patch_size=8), projection_dim=16)
    return StableDiffusionSafetyChecker(config)


def sd15_base(path, tiny_model, mindone_saved):
    """A copy of the tiny model laid out like SD-1.5: plus a safety checker and a feature extractor, named in
    model_index.json as SD-1.5's does. mindone_saved: the text encoder and the safety checker are written by mindone's
    own save_pretrained (MindSpore names), else under PyTorch names. Returns the folder and the checker's weights."""
    from transformers import CLIPImageProcessor

    base = Path(shutil.copytree(tiny_model, path))
    checker = tiny_safety_checker()
    if mindone_saved:
        checker.save_pretrained(str(base / "safety_checker"))
        models.load_text_encoder(base)[1].save_pretrained(str(base / "text_encoder"))
    else:
        models.save_pretrained_pytorch(checker, base / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(
        str(base / "feature_extractor"))
    index = json.loads((base / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (base / "model_index.json").write_text(json.dumps(index, indent=2))
    return base, models.pytorch_state_dict(checker)


def train(base, store, out):
    return run(TrainConfig(pretrained_model_name_or_path=str(base), latent_store=str(store), output_dir=str(out),
                           train_batch_size=4, max_train_steps=1, report_to="none", jit=False))


def files(folder) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(Path(folder).rglob("*")) if f.is_file()}


def safetensors_format(path):
    with safe_open(str(path), framework="np") as f:
        return (f.metadata() or {}).get("format")


def assert_same(got: dict, want: dict):
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def mindone_sample(out):
    from mindone.diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, height=SIZE, width=SIZE,
                 generator=np.random.default_rng(0))[0][0]
    return pipe, image


def pytorch_load(out) -> dict:
    """What PyTorch diffusers makes of `out`: tests/peer_load.py's report, run in .venv-peer."""
    if not (PEER / ".installed").is_file():
        pytest.fail(f"{PEER} is missing or incomplete: run `make test`, which builds it (PyTorch diffusers)",
                    pytrace=False)
    done = subprocess.run([str(PEER / "bin" / "python"), str(PEER_SCRIPT), str(out), str(SIZE)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    assert done.returncode == 0, f"PyTorch diffusers cannot load {out}: {last}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sd15_layout_output_loads_in_mindone_and_pytorch(tiny_model, tiny_store, tmp_path, t2i_home):
    base, _ = sd15_base(tmp_path / "base", tiny_model, mindone_saved=False)
    out = tmp_path / "out"
    train(base, tiny_store, out)
    peer = pytorch_load(out)
    assert peer["image_shape"] == [1, SIZE, SIZE, 3]
    assert peer["components"]["safety_checker"] == "StableDiffusionSafetyChecker"
    assert peer["components"]["feature_extractor"] == "CLIPImageProcessor"
    assert peer["keys"] == NO_KEY_PROBLEMS
    pipe, image = mindone_sample(out)
    assert type(pipe.safety_checker).__name__ == "StableDiffusionSafetyChecker"
    assert type(pipe.feature_extractor).__name__ == "CLIPImageProcessor"
    assert image.size == (SIZE, SIZE)
    # PyTorch names already: every component but the trained UNet is the base's, byte for byte.
    for name in ("vae", "text_encoder", "tokenizer", "scheduler", "safety_checker", "feature_extractor"):
        assert files(out / name) == files(base / name), name
    assert (out / "model_index.json").read_bytes() == (base / "model_index.json").read_bytes()


def test_mindone_saved_base_gives_an_output_under_pytorch_names(tiny_model, demo_data, tmp_path, t2i_home):
    from t2i.precompute import PrecomputeConfig
    from t2i.precompute import run as precompute

    base, checker_state = sd15_base(tmp_path / "base", tiny_model, mindone_saved=True)
    with safe_open(str(base / "text_encoder" / "model.safetensors"), framework="np") as f:
        assert "text_model.embeddings.token_embedding.embedding_table" in f.keys()  # truly MindSpore names
    store = tmp_path / "latents.zarr"
    precompute(PrecomputeConfig(pretrained_model_name_or_path=str(base), train_data_dir=str(demo_data),
                                output_dir=str(store), resolution=SIZE, center_crop=True))
    out = tmp_path / "out"
    train(base, store, out)
    wanted = {"text_encoder": load_file(str(tiny_model / "text_encoder" / "model.safetensors")),
              "safety_checker": checker_state}
    for name, state in wanted.items():
        assert safetensors_format(out / name / "model.safetensors") == "pt"
        assert_same(load_file(str(out / name / "model.safetensors")), state)
        assert (out / name / "config.json").read_bytes() == (base / name / "config.json").read_bytes()
    # mindone writes the VAE under PyTorch names (format "np", which diffusers does not check): copied as it is.
    for name in ("vae", "tokenizer", "scheduler", "feature_extractor"):
        assert files(out / name) == files(base / name), name
    _, image = mindone_sample(out)
    assert image.size == (SIZE, SIZE)
    peer = pytorch_load(out)
    assert peer["image_shape"] == [1, SIZE, SIZE, 3]
    assert peer["keys"] == NO_KEY_PROBLEMS


@pytest.mark.parametrize("layout", ["mindone_fp16", "transformers_5_flat", "pytorch_names_numpy_format"])
def test_text_encoder_layouts_are_written_as_pytorch_transformers_writes_them(tiny_model, tmp_path, layout):
    base = Path(shutil.copytree(tiny_model, tmp_path / "base"))
    weights = base / "text_encoder" / "model.safetensors"
    state = load_file(str(weights))
    if layout == "mindone_fp16":
        models.load_text_encoder(base, dtype=ms.float16)[1].save_pretrained(str(base / "text_encoder"))
        state = {k: v.astype(np.float16) for k, v in state.items()}
    elif layout == "transformers_5_flat":
        save_file({k.removeprefix("text_model."): v for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    else:
        save_file(state, str(weights), metadata={"format": "np"})  # transformers refuses any format but pt/tf/flax/mlx
    out = tmp_path / "out"
    pipeline.write_components(base, out)
    written = out / "text_encoder" / "model.safetensors"
    assert safetensors_format(written) == "pt"
    got = load_file(str(written))
    assert sorted(got) == sorted(TORCH_KEYS["text_encoder"]["keys"])
    assert_same(got, state)
    assert files(out / "vae") == files(base / "vae")


def test_a_component_named_but_absent_is_a_one_line_error_before_anything_is_written(tiny_model, tmp_path):
    base = Path(shutil.copytree(tiny_model, tmp_path / "base"))
    index = json.loads((base / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (base / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        pipeline.write_components(base, out)
    assert "\n" not in str(err.value) and "safety_checker" in str(err.value)
    assert not out.exists()
