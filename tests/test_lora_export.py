"""t2i-export of a t2i LoRA: --format kohya (kohya sd-scripts' single-file layout, read back by mindone's non-diffusers
converter and by t2i-infer --lora) and --format merged / --merge_lora (a full pipeline folder with the adapter fused into
the UNet). No training: the adapter is t2i.interop.lora's on the tiny UNet with random non-zero lora_B, saved as t2i-train saves
it."""

import re

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import random_adapter
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from test_lora import base_pipe_with, run_peer, unet_inputs, unet_output

from t2i import export
from t2i.interop import lora, models

RANK, ALPHA = 4, 12.0  # scale 3: an alpha lost on the way (alpha = rank, or peft's default 8) changes the output
# The CLIP layers kohya's sd-scripts give text-encoder adapters.
KOHYA_TEXT_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                     "mlp.fc2")


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    """A t2i LoRA output folder: the adapter file and the training config that names its base."""
    return random_adapter(tiny_model, tmp_path_factory.mktemp("lora") / "out", RANK, ALPHA, lora.DEFAULT_TARGETS)


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
        lora.apply(models.load_unet(tiny_model), [(bad, 1.0)])


def test_pytorch_diffusers_loads_the_kohya_file(adapter, kohya, tiny_model, tmp_path):
    """PyTorch diffusers' pipe.load_lora_weights on the kohya file (its own non-diffusers converter) injects exactly
    the adapter keys the diffusers-format file gives, with the same values and scale alpha/rank, warning of no missing
    or unexpected key; the UNet computes what it computes with the diffusers file (the same weights through the same
    ops: 1e-6) and what t2i computes with the kohya file (1e-4, as for the diffusers file)."""
    inputs = unet_inputs()
    peer, (torch_diffusers, torch_kohya) = run_peer(tiny_model, adapter, inputs, tmp_path, kohya=kohya)
    got = peer["kohya"]
    assert got["keys"] == peer["expected"] and len(got["keys"]) == 64
    assert got["differ"] == [] and got["scales"] == [ALPHA / RANK]
    assert not [w for w in got["warnings"] if re.search(r"(missing|unexpected) (adapter )?keys", w, re.I)], got
    np.testing.assert_allclose(torch_kohya, torch_diffusers, rtol=0, atol=1e-6)
    ours = unet_output(base_pipe_with(tiny_model, [(kohya, 1.0)]).unet, inputs)
    assert np.abs(ours - unet_output(models.load_unet(tiny_model), inputs)).max() > 1e-2
    np.testing.assert_allclose(torch_kohya, ours, rtol=0, atol=1e-4)


def test_merged_export_is_a_pipeline_with_the_adapter_fused(adapter, tiny_model, tmp_path, monkeypatch):
    """--merge_lora: a full pipeline folder (the base's components, a UNet under plain PyTorch names, a model card
    naming the base and the adapter) whose UNet computes base + adapter; only the UNet is loaded (the base's other
    components are copied); refused into a .safetensors name or over an existing folder."""
    merged = tmp_path / "merged"
    with monkeypatch.context() as mp:
        for loader in ("load_vae", "load_text_encoder"):
            mp.setattr(models, loader, lambda *a, _name=loader, **k: pytest.fail(f"merged export called {_name}"))
        code, output = t2i_export("--model", adapter, "--merge_lora", "--output", merged)
    assert code == 0, output
    assert sorted(p.name for p in merged.iterdir()) == ["README.md", "model_index.json", "scheduler", "text_encoder",
                                                        "tokenizer", "unet", "vae"]
    card = (merged / "README.md").read_text()
    assert f"**{tiny_model}** with the LoRA adapter `{adapter / lora.WEIGHT_NAME}` (rank 4, alpha 12, on the UNet's " \
           "to_k, to_out.0, to_q, to_v layers) fused into its UNet" in card
    assert "## Training configuration of the adapter" in card and "load_lora_weights" not in card
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


def test_save_adapter_leaves_the_old_file_when_the_write_fails(adapter, tiny_model, tmp_path, monkeypatch):
    """lora.save_adapter writes through t2i.core.atomic: a write that dies half-way leaves the previous adapter file as it
    was and no temp file beside it."""
    import shutil

    import mindone.diffusers.loaders.lora_base as lora_base

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(adapter / lora.WEIGHT_NAME, out / lora.WEIGHT_NAME)
    before = (out / lora.WEIGHT_NAME).read_bytes()
    unet = models.load_unet(tiny_model)
    config = lora.add_adapters(unet, RANK, ALPHA, lora.DEFAULT_TARGETS, 0.0)

    def dies_half_way(weights, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(before[: len(before) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(lora_base, "save_file", dies_half_way)
    with pytest.raises(OSError, match="No space"):
        lora.save_adapter(unet, config, out)
    assert [p.name for p in out.iterdir()] == [lora.WEIGHT_NAME]
    assert (out / lora.WEIGHT_NAME).read_bytes() == before
    monkeypatch.undo()
    lora.save_adapter(unet, config, out)
    assert [p.name for p in out.iterdir()] == [lora.WEIGHT_NAME]
    assert all(not v.any() for k, v in load_file(str(out / lora.WEIGHT_NAME)).items() if "lora_B" in k)


def test_a_kohya_files_text_encoder_weights(kohya, tiny_model, tmp_path):
    """A kohya file's text-encoder weights (lora_te_*, which A1111 LoRAs often carry): t2i-infer's loader applies them
    to the text encoder at the --lora scale (each layer computes with W + scale * alpha/r * up @ down); --merge_lora,
    which fuses the UNet only, refuses such a file in one line and writes nothing."""
    import mindspore as ms

    tokenizer, text_encoder = models.load_text_encoder(tiny_model)
    state, deltas = dict(load_file(str(kohya))), {}
    rng = np.random.default_rng(1)
    for name, cell in text_encoder.cells_and_names():
        if name.endswith(KOHYA_TEXT_LAYERS):
            key = "lora_te_" + name.replace(".", "_")
            down = rng.standard_normal((2, cell.weight.shape[1])).astype(np.float32)
            up = (0.1 * rng.standard_normal((cell.weight.shape[0], 2))).astype(np.float32)
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                          f"{key}.alpha": np.asarray(1.0, np.float32)})
            deltas[name] = 0.5 * (1.0 / 2) * up @ down
    assert deltas
    file = tmp_path / "with-te.safetensors"
    save_file(state, str(file))

    ids = ms.Tensor(tokenizer(["a red circle"], padding="max_length", max_length=tokenizer.model_max_length,
                              return_tensors="np").input_ids)
    base = text_encoder(ids)[0].asnumpy()
    got = base_pipe_with(tiny_model, [(file, 0.5)]).text_encoder(ids)[0].asnumpy()
    for name, cell in text_encoder.cells_and_names():
        if name in deltas:
            cell.weight.set_data(ms.Tensor(cell.weight.asnumpy() + deltas[name]))
    want = text_encoder(ids)[0].asnumpy()
    assert np.abs(want - base).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

    code, output = t2i_export("--model", file, "--merge_lora", "--base", tiny_model, "--output", tmp_path / "merged")
    assert code == 2 and f"--model {file}: it holds text-encoder LoRA weights" in output, output
    assert not (tmp_path / "merged").exists()
