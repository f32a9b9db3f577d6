"""t2i-export of a t2i LoRA: --format kohya (kohya sd-scripts' single-file layout, read back by mindone's non-diffusers
converter and by t2i-infer --lora) and --format merged / --merge_lora (a full pipeline folder with the adapter fused into
the UNet). No training: the adapter is t2i.lora's on the tiny UNet with random non-zero lora_B, saved as t2i-train saves
it."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from test_lora import base_pipe_with, unet_inputs, unet_output

from t2i import export, lora, models, train

RANK, ALPHA = 4, 12.0  # scale 3: an alpha lost on the way (alpha = rank, or peft's default 8) changes the output


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    """A t2i LoRA output folder: the adapter file and the training config that names its base."""
    import mindspore as ms

    unet = models.load_unet(tiny_model)
    config = lora.add_adapters(unet, RANK, ALPHA, lora.DEFAULT_TARGETS, 0.0)
    rng = np.random.default_rng(0)
    for name, p in unet.parameters_and_names():
        if ".lora_B." in name:
            p.set_data(ms.Tensor(0.1 * rng.standard_normal(p.shape).astype(np.float32)))
    out = tmp_path_factory.mktemp("lora") / "out"
    lora.save_adapter(unet, config, out)
    (out / train.CONFIG_NAME).write_text(json.dumps({"pretrained_model_name_or_path": str(tiny_model)}))
    return out


def t2i_export(*args):
    result = CliRunner().invoke(export.cli, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def kohya(adapter, tmp_path_factory):
    path = tmp_path_factory.mktemp("kohya") / "naruto.safetensors"
    code, output = t2i_export("--model", adapter, "--format", "kohya", "--output", path)
    assert code == 0, output
    return path


def test_kohya_export_round_trips_through_mindones_converter(adapter, kohya, tmp_path):
    """kohya's names (lora_unet_ + the module path with _, lora_down = A, lora_up = B, a scalar alpha per layer); mindone's
    lora_state_dict (the non-diffusers converter load_lora_weights runs) gives back every tensor and alpha/rank."""
    from mindone.diffusers import StableDiffusionPipeline
    from mindone.diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    want = load_file(str(adapter / lora.WEIGHT_NAME))
    got = load_file(str(kohya))
    assert len(want) == 64 and len(got) == 96
    assert all(re.fullmatch(r"lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in got)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    np.testing.assert_array_equal(
        got[f"{name}.lora_up.weight"],
        want["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight"])
    assert {(v.shape, float(v)) for k, v in got.items() if k.endswith(".alpha")} == {((), ALPHA)}
    with safe_open(str(kohya), "np") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(RANK), str(ALPHA))

    for path, dtype in ((kohya, np.float32), (tmp_path / "half.safetensors", np.float16)):
        if dtype == np.float16:
            code, output = t2i_export("--model", adapter / lora.WEIGHT_NAME, "--format", "kohya", "--half",
                                      "--output", path)
            assert code == 0, output
        state, alphas = StableDiffusionPipeline.lora_state_dict(str(path.parent), weight_name=path.name)
        back = {k: v.asnumpy() for k, v in convert_unet_state_dict_to_peft(state).items()}
        assert set(back) == set(want)
        for key, value in want.items():
            assert back[key].dtype == dtype
            np.testing.assert_array_equal(back[key], value.astype(dtype), err_msg=key)
        assert len(alphas) == 32 and {a / RANK for a in alphas.values()} == {ALPHA / RANK}


def test_infer_lora_takes_the_kohya_file(adapter, kohya, tiny_model, tmp_path):
    """t2i-infer --lora's loader (lora.apply) on the kohya file computes the UNet the diffusers file gives, at any
    scale; a kohya file for another geometry is refused before loading."""
    inputs = unet_inputs()
    diffusers = unet_output(base_pipe_with(tiny_model, [(adapter, 0.5)]).unet, inputs)
    ours = unet_output(base_pipe_with(tiny_model, [(kohya, 0.5)]).unet, inputs)
    assert np.abs(diffusers - unet_output(models.load_unet(tiny_model), inputs)).max() > 1e-2
    np.testing.assert_allclose(ours, diffusers, rtol=0, atol=1e-6)

    state = load_file(str(kohya))
    key = next(k for k in state if k.endswith("attn2_to_k.lora_down.weight"))
    bad = tmp_path / "other.safetensors"
    save_file({**state, key: np.zeros((RANK, 48), np.float32)}, str(bad))
    with pytest.raises(ValueError, match=re.escape(f"--lora {bad}: ") + ".*another base geometry"):
        lora.check_fits(models.load_unet(tiny_model), bad)


def test_merged_export_is_a_pipeline_with_the_adapter_fused(adapter, tiny_model, tmp_path):
    """--merge_lora: a full pipeline folder (the base's components, a UNet under plain PyTorch names) whose UNet
    computes base + adapter; refused into a .safetensors name or over an existing folder."""
    merged = tmp_path / "merged"
    code, output = t2i_export("--model", adapter, "--merge_lora", "--output", merged)
    assert code == 0, output
    assert sorted(p.name for p in merged.iterdir()) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                                        "unet", "vae"]
    unet_file = merged / "unet" / "diffusion_pytorch_model.safetensors"
    base_file = tiny_model / "unet" / "diffusion_pytorch_model.safetensors"
    assert set(load_file(str(unet_file))) == set(load_file(str(base_file)))
    for part in ("vae", "text_encoder"):
        for file in (tiny_model / part).iterdir():
            assert (merged / part / file.name).read_bytes() == file.read_bytes(), file

    inputs = unet_inputs()
    fused = unet_output(models.load_unet(merged), inputs)
    with_adapter = unet_output(base_pipe_with(tiny_model, [(adapter, 1.0)]).unet, inputs)
    assert np.abs(with_adapter - unet_output(models.load_unet(tiny_model), inputs)).max() > 1e-2
    np.testing.assert_allclose(fused, with_adapter, rtol=0, atol=1e-5)

    for args, words in ((["--merge_lora", "--output", merged], "exists"),
                        (["--format", "merged", "--output", tmp_path / "m.safetensors"], "pipeline folder"),
                        (["--format", "kohya", "--merge_lora", "--output", tmp_path / "k.safetensors"], "--merge_lora")):
        code, output = t2i_export("--model", adapter, *args)
        assert code == 2 and words in output, output
