"""Loading the pipeline's components from a local diffusers folder, and fingerprinting what the store depends on."""

import hashlib
from pathlib import Path

import mindspore as ms

DTYPES = {"no": ms.float32, "fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}
# The store's latents and text states are functions of these components only; the UNet is what gets trained.
FINGERPRINT_COMPONENTS = ("vae", "text_encoder", "tokenizer")


def check_model_dir(path) -> Path:
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ValueError(
            f"--pretrained_model_name_or_path: {path} is not a diffusers pipeline folder (no model_index.json); "
            "pass a local folder such as one written by `save_pretrained` or `t2i-tiny-model`"
        )
    return path


def fingerprint(model_dir, components=FINGERPRINT_COMPONENTS) -> str:
    """sha256 over the names and bytes of every file in the given component folders (configs, weights, vocab)."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for component in components:
        folder = model_dir / component
        if not folder.is_dir():
            raise ValueError(f"{model_dir}: missing component folder {component}/")
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(model_dir)).encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()


def load_vae(model_dir, revision=None, variant=None, dtype=ms.float32):
    from mindone.diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(
        str(model_dir), subfolder="vae", revision=revision, variant=variant, mindspore_dtype=dtype
    )


def load_text_encoder(model_dir, revision=None, variant=None, dtype=ms.float32):
    from transformers import CLIPTokenizer

    from mindone.transformers import CLIPTextModel

    tokenizer = CLIPTokenizer.from_pretrained(str(model_dir), subfolder="tokenizer", revision=revision)
    encoder = CLIPTextModel.from_pretrained(
        str(model_dir), subfolder="text_encoder", revision=revision, variant=variant, dtype=dtype
    )
    encoder.set_train(False)
    return tokenizer, encoder


def load_unet(model_dir, revision=None, variant=None, dtype=ms.float32):
    from mindone.diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(
        str(model_dir), subfolder="unet", revision=revision, variant=variant, mindspore_dtype=dtype
    )


def encode_text(tokenizer, text_encoder, captions):
    """CLIP last hidden state for each caption, padded to the tokenizer's max length as the seed script does."""
    ids = tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="np"
    ).input_ids
    return text_encoder(ms.Tensor(ids, ms.int32))[0]
