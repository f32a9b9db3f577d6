"""Regenerate the PyTorch reference data in tests/data with real PyTorch; the tests themselves never import torch.

Run in a separate venv holding torch, diffusers and transformers 4.x, against a model from `t2i-tiny-model`:

    python -m venv .venv-peer && .venv-peer/bin/pip install torch==2.13.0 diffusers transformers==4.57.1
    .venv/bin/t2i-tiny-model --output_dir /tmp/tiny --vae_train_steps 0   # the tests' model: a random decoder
    .venv-peer/bin/python tests/data/make_torch_data.py /tmp/tiny

Writes
  torch_keys.json       the state-dict names and shapes PyTorch gives each component of the tiny model's configs
  torch_tensors.bin     torch.save of tensors in every dtype and memory layout the .bin reader must handle, and
  torch_tensors.safetensors  the same values written by safetensors (bf16 as float32, which NumPy can hold)
  torch_model/          text_encoder (fp16 variant), vae and unet of small random configs saved as .bin by PyTorch
"""

import json
import re
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

HERE = Path(__file__).parent


def shapes(module):
    return {k: list(v.shape) for k, v in sorted(module.state_dict().items())}


def torch_keys(tiny):
    clip = CLIPTextConfig.from_pretrained(tiny / "text_encoder")
    out = {"text_encoder": {"config": clip.to_diff_dict(), "keys": shapes(CLIPTextModel(clip))}}
    for name, cls in (("vae", AutoencoderKL), ("unet", UNet2DConditionModel)):
        config = cls.load_config(tiny / name)
        out[name] = {"config": dict(config), "keys": shapes(cls.from_config(config))}
    text = json.dumps(out, indent=1, sort_keys=True)
    # One line per shape keeps the file short and its diffs readable.
    text = re.sub(r"\[\s+([\d,\s]+?)\s+\]", lambda m: "[" + ", ".join(m.group(1).replace(",", " ").split()) + "]", text)
    (HERE / "torch_keys.json").write_text(text + "\n")


def tensors():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    shared = torch.randn(10, dtype=torch.float64)
    saved = {
        "fp32": base,
        "fp16": base.half(),
        "bf16": base.bfloat16(),
        "int64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "transposed": base.t(),
        "offset_view": base[1:3, 2:],
        "shared_head": shared[:4],
        "shared_tail": shared[6:],
        "parameter": torch.nn.Parameter(torch.ones(2, 3)),
    }
    torch.save(saved, HERE / "torch_tensors.bin")
    plain = {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().contiguous().clone() for k, v in saved.items()}
    save_file(plain, HERE / "torch_tensors.safetensors")


def small_model():
    torch.manual_seed(0)
    root = HERE / "torch_model"
    clip = CLIPTextModel(
        CLIPTextConfig(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=77, projection_dim=16)
    )
    clip.half().save_pretrained(root / "text_encoder", safe_serialization=False, variant="fp16")
    AutoencoderKL(
        block_out_channels=(4,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
    ).save_pretrained(root / "vae", safe_serialization=False)
    UNet2DConditionModel(
        sample_size=8, block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=4, cross_attention_dim=16,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).save_pretrained(root / "unet", safe_serialization=False)


if __name__ == "__main__":
    torch_keys(Path(sys.argv[1]))
    tensors()
    small_model()
