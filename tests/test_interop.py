"""Interop with the PyTorch ecosystem: Hub-layout inputs, PyTorch-loadable outputs, single-file export, card, upload.

The PyTorch reference data in tests/data was made once with real torch/diffusers/transformers by
tests/data/make_torch_data.py; these tests never import torch.
"""

import json
import pickle
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from t2i.interop import models

DATA = Path(__file__).parent / "data"
TORCH_KEYS = json.loads((DATA / "torch_keys.json").read_text())
WEIGHTS = {
    "text_encoder": "text_encoder/model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "unet": "unet/diffusion_pytorch_model.safetensors",
}
LOADERS = {
    "text_encoder": lambda path, **kw: models.load_text_encoder(path, **kw)[1],
    "vae": models.load_vae,
    "unet": models.load_unet,
}


def loaded(model) -> dict:
    """A loaded model's weights under PyTorch names, as float32 NumPy arrays."""
    return {k: v.astype(np.float32) for k, v in models.pytorch_state_dict(model).items()}


def assert_same(got: dict, want: dict):
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], np.asarray(value, np.float32), err_msg=key)


@pytest.fixture
def model_copy(tmp_path, tiny_model):
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


# ---------------------------------------------------------------------------------------------------------------------
# Outputs: what t2i writes is what PyTorch expects


def _config_fields(config):
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}


@pytest.mark.parametrize("component", list(WEIGHTS))
def test_written_weights_have_the_names_and_shapes_pytorch_expects(tiny_model, component):
    reference = TORCH_KEYS[component]
    config = json.loads((tiny_model / component / "config.json").read_text())
    assert _config_fields(config) == _config_fields(reference["config"]), (
        "the tiny model's config changed: rerun tests/data/make_torch_data.py to regenerate torch_keys.json"
    )
    with safe_open(str(tiny_model / WEIGHTS[component]), framework="np") as f:
        written = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        metadata = f.metadata()
    assert written == reference["keys"]
    if component == "text_encoder":
        # transformers refuses safetensors whose format is not pt/tf/flax/mlx; mindone's own save says "np".
        assert metadata["format"] == "pt"


def test_pytorch_named_text_encoder_still_loads_in_mindone(tiny_model):
    _, encoder = models.load_text_encoder(tiny_model)
    assert_same(loaded(encoder), load_file(str(tiny_model / WEIGHTS["text_encoder"])))


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: every layout published checkpoints come in


def _flat_clip(state):
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def _mindspore_names(state):
    renames = {".token_embedding.weight": ".token_embedding.embedding_table",
               ".position_embedding.weight": ".position_embedding.embedding_table"}
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        if "norm" in key:
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        out[key] = value
    return out


def test_text_encoder_in_transformers_5_layout_loads_complete(model_copy):
    from mindone.transformers import CLIPTextModel

    path = model_copy / WEIGHTS["text_encoder"]
    state = load_file(str(path))
    save_file(_flat_clip(state), str(path), metadata={"format": "pt"})
    # mindone alone would leave every weight random, with a warning only.
    _, info = CLIPTextModel.from_pretrained(str(model_copy / "text_encoder"), output_loading_info=True)
    assert len(info["missing_keys"]) == len(state)
    _, encoder = models.load_text_encoder(model_copy)
    assert_same(loaded(encoder), state)


def test_text_encoder_saved_under_mindspore_names_loads(model_copy):
    path = model_copy / WEIGHTS["text_encoder"]
    state = load_file(str(path))
    save_file(_mindspore_names(state), str(path), metadata={"format": "np"})
    _, encoder = models.load_text_encoder(model_copy)
    assert_same(loaded(encoder), state)


@pytest.mark.parametrize("component", ["text_encoder", "unet"])
def test_fp16_variant_loads(model_copy, component):
    path = model_copy / WEIGHTS[component]
    state = load_file(str(path))
    half = {k: v.astype(np.float16) for k, v in state.items()}
    save_file(half, str(path.with_suffix(".fp16.safetensors")), metadata={"format": "pt"})
    path.unlink()
    assert_same(loaded(LOADERS[component](model_copy, variant="fp16")), half)


def test_sharded_weights_load(model_copy):
    path = model_copy / WEIGHTS["vae"]
    state = load_file(str(path))
    keys = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(path.parent / name), metadata={"format": "pt"})
    weight_map = {k: name for name, part in shards.items() for k in part}
    index = {"metadata": {"total_size": sum(v.nbytes for v in state.values())}, "weight_map": weight_map}
    (path.parent / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    path.unlink()
    assert_same(loaded(models.load_vae(model_copy)), state)


def test_torch_bin_reader_matches_what_torch_wrote():
    got = models.read_torch_bin(DATA / "torch_tensors.bin")
    want = load_file(str(DATA / "torch_tensors.safetensors"))
    assert set(got) == set(want)
    assert got["bf16"].dtype == ml_dtypes.bfloat16
    for key, value in want.items():
        assert got[key].shape == value.shape, key
        if key != "bf16":
            assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key].astype(value.dtype), value, err_msg=key)


def test_torch_bin_reader_refuses_code(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"weight": Exploit()}))
    with pytest.raises(ValueError, match=r"evil\.bin: .*not allowed"):
        models.read_torch_bin(path)
    assert not marker.exists()


def test_torch_bin_folder_loads_through_every_loader(tmp_path, tiny_model):
    model = Path(shutil.copytree(DATA / "torch_model", tmp_path / "model"))
    shutil.copytree(tiny_model / "tokenizer", model / "tokenizer")
    bins = {"text_encoder": "text_encoder/pytorch_model.fp16.bin", "vae": "vae/diffusion_pytorch_model.bin",
            "unet": "unet/diffusion_pytorch_model.bin"}
    for component, file in bins.items():
        variant = "fp16" if component == "text_encoder" else None
        assert_same(loaded(LOADERS[component](model, variant=variant)), models.read_torch_bin(model / file))


@pytest.mark.parametrize(
    "component,dropped",
    [("text_encoder", "text_model.final_layer_norm.weight"), ("vae", "decoder.conv_out.bias"),
     ("unet", "conv_in.weight")],
)
def test_missing_weights_are_refused_naming_component_and_keys(model_copy, component, dropped):
    path = model_copy / WEIGHTS[component]
    state = load_file(str(path))
    del state[dropped]
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        LOADERS[component](model_copy)
    message = str(err.value)
    assert "\n" not in message
    assert f"1 of {len(state) + 1} {component} weights" in message and dropped in message


@pytest.mark.parametrize(
    "component,key", [("text_encoder", "text_model.final_layer_norm.weight"), ("vae", "decoder.conv_out.bias")]
)
def test_weights_of_the_wrong_shape_are_refused_in_one_line(model_copy, component, key):
    path = model_copy / WEIGHTS[component]
    state = load_file(str(path))
    state[key] = np.zeros(5, np.float32)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        LOADERS[component](model_copy)
    assert "\n" not in str(err.value)
    assert f"{component}: cannot load the {component} weights" in str(err.value) and "(5,)" in str(err.value)


def test_damaged_weights_file_is_refused_in_one_line(model_copy):
    path = model_copy / WEIGHTS["unet"]
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError) as err:
        models.load_unet(model_copy)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{model_copy / 'unet'}: cannot load the unet weights")


def test_unrecognised_text_encoder_names_are_refused(model_copy):
    path = model_copy / WEIGHTS["text_encoder"]
    save_file({f"clip.{k}": v for k, v in load_file(str(path)).items()}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"36 of 36 text_encoder weights .* would be left randomly initialised"):
        models.load_text_encoder(model_copy)


def test_missing_weights_file_and_variant_are_named(model_copy):
    (model_copy / WEIGHTS["vae"]).unlink()
    with pytest.raises(ValueError, match=r"vae: no vae weights \(diffusion_pytorch_model.safetensors"):
        models.load_vae(model_copy)
    with pytest.raises(ValueError, match=r"drop --variant fp16"):
        models.load_unet(model_copy, variant="fp16")


# ---------------------------------------------------------------------------------------------------------------------
# Single-file export


def _back_to_diffusers(single, unet_config, vae_config):
    """mindone's own original-layout -> diffusers converters (the from_single_file path), on NumPy state dicts."""
    import mindspore as ms
    from mindone.diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    tensors = {k: ms.Tensor(v) for k, v in single.items()}
    parts = (convert_ldm_unet_checkpoint(dict(tensors), dict(unet_config)),
             convert_ldm_vae_checkpoint(dict(tensors), dict(vae_config)),
             convert_ldm_clip_checkpoint(dict(tensors)))
    return [{k: v.asnumpy() for k, v in part.items()} for part in parts]


def test_export_round_trips_through_mindones_single_file_converters(tmp_path, tiny_model):
    from t2i.export import cli

    output = tmp_path / "tiny.safetensors"
    result = CliRunner().invoke(cli, ["--model", str(tiny_model), "--output", str(output)])
    assert result.exit_code == 0, result.output
    single = load_file(str(output))
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in single)
    assert {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.output_blocks.1.1.conv.weight",
            "first_stage_model.encoder.down.0.downsample.conv.weight",
            "first_stage_model.decoder.up.1.block.1.norm1.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight"} <= set(single)
    assert single["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    unet, vae, clip = _back_to_diffusers(single, json.loads((tiny_model / "unet/config.json").read_text()),
                                         json.loads((tiny_model / "vae/config.json").read_text()))
    for got, component in ((unet, "unet"), (vae, "vae"), (clip, "text_encoder")):
        assert_same(got, load_file(str(tiny_model / WEIGHTS[component])))
    assert len(single) == sum(len(TORCH_KEYS[c]["keys"]) for c in WEIGHTS)

    half = tmp_path / "half.safetensors"
    result = CliRunner().invoke(cli, ["--model", str(tiny_model), "--output", str(half), "--half"])
    assert result.exit_code == 0, result.output
    halved = load_file(str(half))
    assert {v.dtype for v in halved.values()} == {np.dtype(np.float16)}
    np.testing.assert_array_equal(halved["model.diffusion_model.out.2.weight"],
                                  single["model.diffusion_model.out.2.weight"].astype(np.float16))


def test_export_maps_sd_block_structure_like_the_original_checkpoints():
    """SD 1.5's structure (4 blocks x 2 layers, no attention in the deepest block) at toy width."""
    import mindspore as ms
    from mindone.diffusers import AutoencoderKL, UNet2DConditionModel

    from t2i.export import unet_to_ldm, vae_to_ldm

    ms.set_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(4, 4, 4, 4), layers_per_block=2, norm_num_groups=2, cross_attention_dim=4,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(block_out_channels=(4, 4, 4, 4), layers_per_block=2, norm_num_groups=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    unet_state, vae_state = models.pytorch_state_dict(unet), models.pytorch_state_dict(vae)
    single = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet_state, unet.config).items()}
    single.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae_state, vae.config).items()})
    # Names that exist in every SD 1.x checkpoint (and identify one in diffusers' single-file loader).
    for key in ("input_blocks.3.0.op.weight", "input_blocks.11.0.out_layers.3.weight", "middle_block.1.proj_in.weight",
                "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.bias",
                "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight", "out.2.weight"):
        assert "model.diffusion_model." + key in single, key
    for key in ("encoder.down.3.block.1.conv2.weight", "decoder.up.0.block.2.norm1.weight",
                "decoder.up.3.upsample.conv.weight", "decoder.mid.attn_1.proj_out.weight", "encoder.norm_out.bias"):
        assert "first_stage_model." + key in single, key
    unet_back, vae_back, _ = _back_to_diffusers(single, unet.config, vae.config)
    assert_same(unet_back, unet_state)
    assert_same(vae_back, vae_state)


def test_open_clip_text_encoder_export_round_trips():
    """SD 2.x (gelu OpenCLIP): open_clip names with fused q/k/v, undone by mindone's converter."""
    from mindone.diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    from t2i.export import clip_to_ldm

    rng = np.random.default_rng(0)
    width = 8
    state = {"text_model.embeddings.token_embedding.weight": rng.random((20, width)),
             "text_model.embeddings.position_embedding.weight": rng.random((7, width)),
             "text_model.final_layer_norm.weight": rng.random(width),
             "text_model.final_layer_norm.bias": rng.random(width)}
    for i in range(2):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            state[f"text_model.encoder.layers.{i}.{part}.weight"] = rng.random((width, width))
            state[f"text_model.encoder.layers.{i}.{part}.bias"] = rng.random(width)
        for part, shape in (("layer_norm1", (width,)), ("layer_norm2", (width,)), ("mlp.fc1", (2 * width, width)),
                            ("mlp.fc2", (width, 2 * width))):
            state[f"text_model.encoder.layers.{i}.{part}.weight"] = rng.random(shape)
            state[f"text_model.encoder.layers.{i}.{part}.bias"] = rng.random(shape[:1])
    single = clip_to_ldm(state, {"hidden_act": "gelu"})
    assert single["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * width, width)
    assert {"cond_stage_model.model.ln_final.weight", "cond_stage_model.model.positional_embedding"} <= set(single)
    back = convert_open_clip_checkpoint(SimpleNamespace(config=SimpleNamespace(hidden_size=width)), single)
    assert set(back) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(np.asarray(back[key]), value, err_msg=key)


def test_export_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_model):
    from t2i.export import cli

    runner = CliRunner()
    output = tmp_path / "out.safetensors"
    cases = [(["--model", str(tmp_path), "--output", str(output)], "--model"),
             (["--model", str(tiny_model), "--output", str(tmp_path / "out.ckpt")], "--output")]
    for args, flag in cases:
        result = runner.invoke(cli, args)
        assert result.exit_code != 0
        assert result.output.count("\n") == 1 and result.output.startswith(f"error: {flag}"), result.output
    assert list(tmp_path.iterdir()) == []
    output.write_bytes(b"keep")
    result = runner.invoke(cli, ["--model", str(tiny_model), "--output", str(output)])
    assert result.exit_code != 0 and "--overwrite" in result.output
    assert output.read_bytes() == b"keep"


# ---------------------------------------------------------------------------------------------------------------------
# Model card, Hub upload, memory-efficient attention


def _front_matter(text):
    import yaml

    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_model_card_records_the_training(tmp_path, tiny_model):
    from PIL import Image

    from t2i.interop.modelcard import write_model_card

    out = tmp_path / "sd-finetuned"
    grid = out / "validation" / "step-000010.png"
    grid.parent.mkdir(parents=True)
    Image.new("RGB", (8, 4), "red").save(grid)
    config = {"learning_rate": 1e-4, "train_batch_size": 16, "validation_prompts": ("a red circle", "a | pipe")}
    path = write_model_card(out, base_model="runwayml/stable-diffusion-v1-5", dataset="lambdalabs/naruto-blip-captions",
                            config=config, steps=10, final_loss=0.123456, val_loss=None, validation_image=grid)
    meta, body = _front_matter(path.read_text())
    assert meta["license"] == "other"
    assert meta["base_model"] == "runwayml/stable-diffusion-v1-5"
    assert meta["datasets"] == ["lambdalabs/naruto-blip-captions"]
    assert set(meta["tags"]) >= {"stable-diffusion", "text-to-image", "diffusers", "t2i", "mindspore"}
    assert "![validation images](validation/step-000010.png)" in body
    assert "optimizer steps: 10" in body and "final training loss: 0.12346" in body
    assert "validation loss (held-out samples): not measured" in body
    assert "| learning_rate | 0.0001 |" in body and "a \\| pipe" in body

    # A local base model is named in the text only (front matter wants Hub ids); an outside image is copied in.
    outside = tmp_path / "grid.png"
    Image.new("RGB", (8, 4), "blue").save(outside)
    write_model_card(out, base_model=str(tiny_model), dataset=None, config={}, steps=1, final_loss=1.0, val_loss=0.5,
                     validation_image=outside)
    meta, body = _front_matter((out / "README.md").read_text())
    assert "base_model" not in meta and "datasets" not in meta
    assert str(tiny_model) in body and "![validation images](val_imgs_grid.png)" in body
    assert (out / "val_imgs_grid.png").read_bytes() == outside.read_bytes()


class FakeHfApi:
    calls = []
    fail_with = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        if self.fail_with:
            raise self.fail_with
        self.calls.append(("create_repo", repo_id, self.token, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return SimpleNamespace(commit_url=f"https://hub.example/{kwargs['repo_id']}/commit/1")


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHfApi.calls, FakeHfApi.fail_with = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def test_push_to_hub_creates_repo_and_uploads_folder(tmp_path, fake_hub):
    from t2i.interop.hub import push_to_hub

    url = push_to_hub(tmp_path, "me/sd-finetuned", token="hf_x", private=True)
    assert url == "https://hub.example/me/sd-finetuned/commit/1"
    (_, repo, token, create), (_, upload) = fake_hub.calls
    assert (repo, token, create["private"], create["exist_ok"]) == ("me/sd-finetuned", "hf_x", True, True)
    assert upload["folder_path"] == str(tmp_path) and upload["repo_id"] == "me/sd-finetuned"
    assert "checkpoint-*" in upload["ignore_patterns"]


def test_push_to_hub_failure_is_one_clear_line(tmp_path, fake_hub):
    import requests
    from huggingface_hub.errors import LocalTokenNotFoundError

    from t2i.interop.hub import push_to_hub

    for error in (requests.ConnectionError("Max retries exceeded\nwith url"), LocalTokenNotFoundError("no token")):
        fake_hub.fail_with = error
        with pytest.raises(ValueError) as err:
            push_to_hub(tmp_path, "me/sd-finetuned")
        assert "\n" not in str(err.value) and "me/sd-finetuned" in str(err.value) and "--hub_token" in str(err.value)
    with pytest.raises(ValueError, match="not a folder"):
        push_to_hub(tmp_path / "absent", "me/sd-finetuned")


def test_memory_efficient_attention(tiny_model):
    unet = models.load_unet(tiny_model)
    before = {type(p).__name__ for p in unet.attn_processors.values()}
    message = models.enable_memory_efficient_attention(unet, "CPU")
    assert "not available on CPU" in message and "Ascend" in message
    assert {type(p).__name__ for p in unet.attn_processors.values()} == before

    switched = []
    stub = SimpleNamespace(enable_xformers_memory_efficient_attention=lambda: switched.append(True))
    assert "FlashAttentionScore" in models.enable_memory_efficient_attention(stub, "Ascend")
    assert switched == [True]
