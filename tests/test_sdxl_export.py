"""t2i-export of SDXL: --format single-file (the original SDXL/SGM checkpoint layout: `model.diffusion_model.*` with
SDXL's label_emb, `first_stage_model.*`, CLIP-L under `conditioner.embedders.0.transformer.*`, OpenCLIP bigG under
`conditioner.embedders.1.model.*`), loaded by PyTorch diffusers' and mindone's single-file loaders; and --format kohya
of a LoRA on an SDXL base (kohya's SDXL names: the original UNet's module paths, `lora_unet_input_blocks_4_1_...`),
loaded by PyTorch diffusers' load_lora_weights and t2i-infer's lora.apply. No training: the adapter is
t2i.interop.lora's on the tiny SDXL UNet with random non-zero lora_B.

The PyTorch side runs in .venv-peer (PEER_SCRIPT below), skipped when it is missing, as in tests/test_tiny_sdxl.py.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import random_adapter
from safetensors.numpy import load_file, save_file

from t2i import export, train
from t2i.interop import lora, models

PEER_PYTHON = Path(__file__).resolve().parent.parent / ".venv-peer" / "bin" / "python"
RANK, ALPHA = 4, 12.0  # scale 3: an alpha lost on the way changes the output
# Attention, transformer projections and feed-forward, and the ResNets' convolutions, time projections and shortcuts:
# layers in input, middle and output blocks, so the SGM numbering of each kind is exercised.
TARGETS = (*lora.DEFAULT_TARGETS, "proj_in", "proj_out", "ff.net.2", "conv1", "conv2", "time_emb_proj", "conv_shortcut")
COMPONENTS = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "conditioner.embedders.0.",
              "text_encoder_2": "conditioner.embedders.1."}
# One tensor per component, negated in a copy of the export, and its diffusers name: a loader that reads the file gives
# exactly these back negated (one that took the weights from the config folder would not).
MARKS = {"unet": ("model.diffusion_model.label_emb.0.0.weight", "add_embedding.linear_1.weight"),
         "vae": ("first_stage_model.decoder.up.0.block.0.conv1.weight", "decoder.up_blocks.1.resnets.0.conv1.weight"),
         "text_encoder": ("conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc1.weight",
                          "text_model.encoder.layers.1.mlp.fc1.weight"),
         "text_encoder_2": ("conditioner.embedders.1.model.text_projection", "text_projection.weight")}

# Run by .venv-peer's Python (torch, diffusers, peft; no MindSpore, no t2i). `single FOLDER FILE...`: load each FILE
# with StableDiffusionXLPipeline.from_single_file (offline, FOLDER's configs) and print, per file and component, the
# keys of FOLDER's from_pretrained weights missing, extra or different. `lora FOLDER ADAPTER KOHYA INPUTS OUTPUT`: save
# the UNet output on INPUTS with no adapter, with ADAPTER (diffusers layout) and with KOHYA to OUTPUT, and print the
# kohya adapter's keys, those whose values differ from the diffusers file's once loaded, its scales and the loaders'
# warnings.
PEER_SCRIPT = r"""
import json, logging, os, sys, warnings
import numpy as np, torch
from diffusers import StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict

def differences(got, want):
    return {"missing": sorted(set(want) - set(got)), "extra": sorted(set(got) - set(want)),
            "differ": sorted(k for k in want if k in got and not torch.equal(got[k], want[k]))}

def unet_output(pipe, x):
    with torch.no_grad():
        return pipe.unet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                         added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}).sample.numpy()

if sys.argv[1] == "single":
    folder, *files = sys.argv[2:]
    ref = StableDiffusionXLPipeline.from_pretrained(folder)
    pipes = [StableDiffusionXLPipeline.from_single_file(f, config=folder, local_files_only=True) for f in files]
    print(json.dumps([{name: differences(getattr(pipe, name).state_dict(), getattr(ref, name).state_dict())
                       for name in ("unet", "vae", "text_encoder", "text_encoder_2")} for pipe in pipes]))
else:
    folder, adapter, kohya, inputs, output = sys.argv[2:]
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    x = {k: torch.from_numpy(v) for k, v in np.load(inputs).items()}
    base = unet_output(pipe, x)
    pipe.load_lora_weights(adapter, weight_name="pytorch_lora_weights.safetensors", adapter_name="t2i")
    with_adapter = unet_output(pipe, x)
    warned = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(os.path.dirname(kohya), weight_name=os.path.basename(kohya), adapter_name="kohya")
    pipe.set_adapters("kohya")
    np.savez(output, base=base, diffusers=with_adapter, kohya=unet_output(pipe, x))
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="t2i")
    scales = {m.scaling["kohya"] for m in pipe.unet.modules() if hasattr(m, "scaling") and "kohya" in m.scaling}
    print(json.dumps({"keys": differences(get_peft_model_state_dict(pipe.unet, adapter_name="kohya"), loaded),
                      "count": len(loaded), "scales": sorted(scales),
                      "warnings": warned + [str(w.message) for w in caught]}))
"""


def run_peer(*args):
    if not PEER_PYTHON.is_file():
        pytest.skip(f"{PEER_PYTHON} does not exist: run `make peer` to build the PyTorch diffusers venv")
    done = subprocess.run([str(PEER_PYTHON), "-c", PEER_SCRIPT, *map(str, args)], capture_output=True, text=True,
                          check=False, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, (done.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])


def t2i_export(*args):
    result = CliRunner().invoke(export.cli, [str(a) for a in args])
    return result.exit_code, result.output


def unet_inputs():
    """SDXL UNet inputs for the tiny model: 16x16 latents, both encoders' states (80 wide), pooled text (32) and the
    six size/crop numbers."""
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
            "timestep": np.array([999, 10], np.int64),
            "encoder_hidden_states": rng.standard_normal((2, 8, 80)).astype(np.float32),
            "text_embeds": rng.standard_normal((2, 32)).astype(np.float32),
            "time_ids": np.array([[32, 32, 0, 0, 32, 32], [64, 48, 8, 0, 32, 32]], np.float32)}


def unet_output(unet, x):
    return unet(ms.Tensor(x["sample"]), ms.Tensor(x["timestep"]), ms.Tensor(x["encoder_hidden_states"]),
                added_cond_kwargs={"text_embeds": ms.Tensor(x["text_embeds"]), "time_ids": ms.Tensor(x["time_ids"])},
                return_dict=False)[0].asnumpy()


def relative_error(got, want):
    return np.abs(got - want).max() / np.abs(want).max()


def folder_weights(folder) -> dict:
    """Each component's weights as the folder's own files hold them (PyTorch names)."""
    names = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
             "text_encoder": "text_encoder/model.safetensors", "text_encoder_2": "text_encoder_2/model.safetensors"}
    return {c: load_file(str(folder / name)) for c, name in names.items()}


def clip_names(layers) -> dict:
    """A CLIPTextModelWithProjection's weight names (transformers') for `layers` layers, with placeholder values."""
    parts = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1",
             "layer_norm2", "mlp.fc1", "mlp.fc2")
    names = [f"text_model.encoder.layers.{i}.{part}.{kind}" for i in range(layers) for part in parts
             for kind in ("weight", "bias")]
    names += ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
              "text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias", "text_projection.weight"]
    return {name: np.zeros((2, 2), np.float32) for name in names}


@pytest.fixture(scope="module")
def single(tiny_sdxl_model, tmp_path_factory):
    """The tiny SDXL folder exported with --format single-file, and a copy with MARKS negated."""
    path = tmp_path_factory.mktemp("single") / "tiny-sdxl.safetensors"
    code, output = t2i_export("--model", tiny_sdxl_model, "--output", path)
    assert code == 0, output
    state = load_file(str(path))
    marked = path.with_name("marked.safetensors")
    save_file({**state, **{key: -state[key] for key, _ in MARKS.values()}}, str(marked))
    return path, marked


@pytest.fixture(scope="module")
def adapter(tiny_sdxl_model, tmp_path_factory):
    """A t2i LoRA output folder on the tiny SDXL base: the adapter file and the training config naming the base."""
    return random_adapter(tiny_sdxl_model, tmp_path_factory.mktemp("sdxl-lora") / "out", RANK, ALPHA, TARGETS)


@pytest.fixture(scope="module")
def kohya(adapter, tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl-kohya") / "lora.safetensors"
    code, output = t2i_export("--model", adapter, "--format", "kohya", "--output", path)
    assert code == 0, output
    return path


def test_single_file_is_the_sgm_layout_and_mindone_converts_it_back(single, tiny_sdxl_model):
    """Each component's weights under its SGM prefix, as many as the folder has (less OpenCLIP's fused q/k/v);
    mindone's from_single_file (offline, the folder as config) gives the folder's UNet and VAE exactly, read from the
    file (the marked copy gives the marked tensors negated), and its CLIP-L and OpenCLIP converters the text encoders.
    (mindone 0.5.0's from_single_file cannot build the text encoders itself: create_diffusers_clip_model_from_ldm
    reads position_embedding.weight, which MindSpore's Embedding calls embedding_table; they are passed in.)"""
    from mindone.diffusers import StableDiffusionXLPipeline
    from mindone.diffusers.loaders import single_file_utils as sf

    path, marked = single
    state = load_file(str(path))
    want = folder_weights(tiny_sdxl_model)
    fused = 4 * 2  # OpenCLIP's in_proj: per layer (2), q/k/v weights and biases (6 tensors) in 2
    for component, prefix in COMPONENTS.items():
        count = len(want[component]) - (fused if component == "text_encoder_2" else 0)
        assert len([k for k in state if k.startswith(prefix)]) == count, component
    assert len(state) == sum(len(w) for w in want.values()) - fused
    assert state["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"].shape == (144, 48)
    np.testing.assert_array_equal(state["conditioner.embedders.1.model.text_projection"],
                                  want["text_encoder_2"]["text_projection.weight"].T)

    ref = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_model))
    for file, sign in ((path, 1), (marked, -1)):
        pipe = StableDiffusionXLPipeline.from_single_file(str(file), config=str(tiny_sdxl_model), local_files_only=True,
                                                          text_encoder=ref.text_encoder,
                                                          text_encoder_2=ref.text_encoder_2)
        for component in ("unet", "vae"):
            got, mark = models.pytorch_state_dict(getattr(pipe, component)), MARKS[component][1]
            assert set(got) == set(want[component])
            for key, value in want[component].items():
                np.testing.assert_array_equal(got[key], sign * value if key == mark else value, err_msg=key)

    checkpoint = sf.load_single_file_checkpoint(str(path))
    assert sf.is_clip_sdxl_model(checkpoint) and sf.is_open_clip_sdxl_model(checkpoint)
    clip_l = sf.convert_ldm_clip_checkpoint(checkpoint)
    big_g = sf.convert_open_clip_checkpoint(ref.text_encoder_2, checkpoint,
                                            prefix=COMPONENTS["text_encoder_2"] + "model.")
    for got, component in ((clip_l, "text_encoder"), (big_g, "text_encoder_2")):
        assert set(got) == set(want[component]), component
        for key, value in want[component].items():
            np.testing.assert_array_equal(got[key].asnumpy(), value, err_msg=key)


def test_pytorch_diffusers_loads_the_single_file(single, tiny_sdxl_model):
    """StableDiffusionXLPipeline.from_single_file(file, config=folder, local_files_only=True) gives every component's
    weights exactly as from_pretrained(folder), read from the file (the marked copy: exactly the marked ones differ)."""
    path, marked = single
    nothing = {"missing": [], "extra": [], "differ": []}
    assert run_peer("single", tiny_sdxl_model, path, marked) == [
        {c: nothing for c in COMPONENTS}, {c: {**nothing, "differ": [MARKS[c][1]]} for c in COMPONENTS}]


def test_sdxl_base_geometry_maps_to_the_sgm_names():
    """SDXL base's UNet structure at toy width (3 levels of 2 layers, no attention in the first, transformer depths
    1, 2, 3 where the base has 1, 2, 10, text_time conditioning): the names every SDXL checkpoint has, mindone's
    converter gives the weights back; kohya's layer names are the same paths (input_blocks.4.1 is down_blocks.1's first
    attention) and mindone's SDXL LoRA loader maps them back to the adapter's layers; and an OpenCLIP bigG of 10
    layers carries the key both loaders detect an SDXL base checkpoint by."""
    from mindone.diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from mindone.diffusers.loaders import single_file_utils as sf
    from mindone.diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    ms.set_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(4, 8, 8), layers_per_block=2, norm_num_groups=2, cross_attention_dim=8,
        attention_head_dim=2, transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8)
    state = models.pytorch_state_dict(unet)
    single = {"model.diffusion_model." + k: v for k, v in export.unet_to_ldm(state, unet.config).items()}
    for key in ("input_blocks.3.0.op.weight", "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
                "input_blocks.8.1.transformer_blocks.2.ff.net.2.weight", "input_blocks.4.0.skip_connection.weight",
                "middle_block.1.transformer_blocks.2.norm3.weight", "output_blocks.2.2.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.8.0.out_layers.3.weight", "label_emb.0.0.weight",
                "label_emb.0.2.bias"):
        assert "model.diffusion_model." + key in single, key
    assert not any(k.startswith("model.diffusion_model.input_blocks.9.") for k in single)
    back = sf.convert_ldm_unet_checkpoint({k: ms.Tensor(v) for k, v in single.items()}, dict(unet.config))
    assert set(back) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key].asnumpy(), value, err_msg=key)

    lora.add_adapters(unet, RANK, ALPHA, TARGETS, 0.0)
    adapter = lora.adapter_state(unet)
    paths = export.sgm_paths([k.removesuffix(".lora_A.weight") for k in adapter if "lora_A" in k], unet.config)
    assert paths["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == (
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q")
    kohya = lora.to_kohya(adapter, {"lora_alpha": ALPHA}, "test", paths)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    converted, _ = StableDiffusionXLPipeline.lora_state_dict({k: ms.Parameter(v, name=k) for k, v in kohya.items()},
                                                             unet_config=unet.config)
    assert set(convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})) == set(
        adapter)

    big_g = export.clip_to_ldm(clip_names(10), {"hidden_act": "gelu"}, COMPONENTS["text_encoder_2"])
    assert sf.infer_diffusers_model_type(big_g) == "xl_base"


def test_pytorch_diffusers_loads_the_sdxl_kohya_file(adapter, kohya, tiny_sdxl_model, tmp_path):
    """kohya's SDXL names (lora_unet_ + the original UNet's module path); PyTorch diffusers' SDXL load_lora_weights
    (its SGM block mapping and non-diffusers converter) injects exactly the adapter the diffusers-format file gives,
    with the same values and scale alpha/rank, warning of no missing or unexpected key, and the UNet computes what it
    computes with the diffusers file, and what t2i computes with the kohya file (within 1e-4 of the largest value)."""
    state = load_file(str(kohya))
    assert len(state) == 3 * len(load_file(str(adapter / lora.WEIGHT_NAME))) // 2
    assert all(re.fullmatch(r"lora_unet_(input_blocks_\d+|middle_block|output_blocks_\d+)_\d+_[a-z0-9_]+\."
                            r"(lora_down\.weight|lora_up\.weight|alpha)", k) for k in state)
    for layer in ("input_blocks_1_1_transformer_blocks_0_attn2_to_k", "input_blocks_3_0_skip_connection",
                  "middle_block_2_emb_layers_1", "output_blocks_3_1_proj_out", "output_blocks_0_0_in_layers_2"):
        assert f"lora_unet_{layer}.lora_up.weight" in state, layer

    x = unet_inputs()
    np.savez(tmp_path / "inputs.npz", **x)
    peer = run_peer("lora", tiny_sdxl_model, adapter, kohya, tmp_path / "inputs.npz", tmp_path / "out.npz")
    assert peer["keys"] == {"missing": [], "extra": [], "differ": []} and peer["count"] == len(state) // 3 * 2
    assert peer["scales"] == [ALPHA / RANK]
    odd = r"(missing|unexpected) (adapter )?keys"
    assert not [w for w in peer["warnings"] if re.search(odd, w, re.IGNORECASE)], peer
    out = np.load(tmp_path / "out.npz")
    assert relative_error(out["diffusers"], out["base"]) > 1e-2
    assert relative_error(out["kohya"], out["diffusers"]) <= 1e-4
    unet = models.load_unet(tiny_sdxl_model)
    lora.apply(unet, [(kohya, 1.0)])
    assert relative_error(unet_output(unet, x), out["kohya"]) <= 1e-4


def test_infer_lora_applies_the_sdxl_kohya_file(adapter, kohya, tiny_sdxl_model):
    """t2i-infer --lora's loader (lora.apply, mindone's SDXL-aware converter) on the kohya file computes the SDXL UNet
    the diffusers file gives, at a scale other than 1."""
    x = unet_inputs()
    outputs = {}
    for name, path in (("diffusers", adapter), ("kohya", kohya)):
        unet = models.load_unet(tiny_sdxl_model)
        lora.apply(unet, [(path, 0.5)])
        outputs[name] = unet_output(unet, x)
    assert relative_error(outputs["diffusers"], unet_output(models.load_unet(tiny_sdxl_model), x)) > 1e-2
    np.testing.assert_allclose(outputs["kohya"], outputs["diffusers"], rtol=0, atol=1e-6)


def test_kohya_export_refuses_a_lora_without_or_with_another_base(adapter, tiny_model, tmp_path):
    """kohya names SD and SDXL layers differently, so the base decides: a LoRA file with no training config beside
    it and no --base is refused, as is a --base whose UNet cross-attends to another width; one line, nothing written."""
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((adapter / lora.WEIGHT_NAME).read_bytes())
    out = tmp_path / "kohya.safetensors"
    code, output = t2i_export("--model", bare, "--format", "kohya", "--output", out)
    assert code == 2 and output.count("\n") == 1, output
    assert f"--model {bare}: no {train.CONFIG_NAME} beside it names the LoRA's base" in output and "--base" in output
    code, output = t2i_export("--model", adapter, "--format", "kohya", "--base", tiny_model, "--output", out)
    assert code == 2 and output.count("\n") == 1, output
    assert "its layers take 80-wide text states, its base" in output and "has 32: a LoRA for another base" in output
    assert not out.exists()
