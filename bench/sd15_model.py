"""A random-weight SD-1.5 folder in the published layout (stable-diffusion-v1-5/stable-diffusion-v1-5): UNet 860M,
VAE, CLIP-L text encoder, a 49,408-token CLIP tokenizer, the PNDM scheduler config, safety checker (CLIP ViT-L/14)
and feature extractor, each component's fp32 safetensors under PyTorch names plus an fp16 variant. No model can be
downloaded here, so this stands in for the real one; every loader in t2i reads it as it would read the real one."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import SD15_CLIP, SD15_UNET, SD15_VAE
from t2i.core.atomic import atomic_dir

# SD-1.5's tokenizer: 256 byte symbols, the same word-final, 48,894 merges and <|startoftext|>, <|endoftext|>.
CLIP_VOCAB = 49408
CLIP_MERGES = CLIP_VOCAB - 2 * 256 - 2

# model_index.json, scheduler_config.json and preprocessor_config.json as the published folder has them.
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "trained_betas": None}
FEATURE_EXTRACTOR = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
                     "do_normalize": True, "do_rescale": True, "do_resize": True,
                     "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
                     "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224}}
VISION_L14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 224, "patch_size": 14, "projection_dim": 768}


def tokenizer_words(seed=0) -> list:
    """Random lowercase words whose merge chains (tiny.build_bpe: one merge per distinct prefix of two or more
    symbols) number exactly CLIP_MERGES, so the vocabulary has SD-1.5's 49,408 tokens."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    prefixes, words = set(), []
    while len(prefixes) < CLIP_MERGES:
        word = "".join(rng.choice(letters, size=rng.integers(2, 9)))
        new = {word[:k] for k in range(2, len(word))} | {word + "</w>"}
        if len(prefixes) + len(new - prefixes) <= CLIP_MERGES:
            prefixes |= new
            words.append(word)
    return words


def _save(model, folder: Path):
    """The component in fp32 under PyTorch names, then its fp16 variant (`<name>.fp16.safetensors`)."""
    from t2i.interop.models import WEIGHT_NAMES, save_pretrained_pytorch, save_pytorch_weights

    save_pretrained_pytorch(model, folder)
    name = Path(next(n for n in WEIGHT_NAMES[folder.name] if n.endswith(".safetensors")))
    save_pytorch_weights(model, folder / f"{name.stem}.fp16{name.suffix}", dtype=np.float16)


def build_sd15_model(output_dir, seed=0) -> Path:
    """Write the folder (atomically): about 5.5 GB of fp32 weights and 2.7 GB of fp16; peak RSS about 9 GB."""
    import mindspore as ms
    from mindone.diffusers import AutoencoderKL, UNet2DConditionModel
    from mindone.diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from mindone.transformers import CLIPTextModel
    from transformers import CLIPConfig, CLIPTextConfig

    from t2i.demo.tiny import write_tokenizer

    ms.set_seed(seed)
    with atomic_dir(output_dir) as tmp:
        tmp = Path(tmp)
        tokenizer = write_tokenizer(tmp / "tokenizer", tokenizer_words(seed), max_length=77)
        assert len(tokenizer) == CLIP_VOCAB, len(tokenizer)
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        _save(CLIPTextModel(CLIPTextConfig(**SD15_CLIP, **ids)), tmp / "text_encoder")
        _save(AutoencoderKL(**SD15_VAE, scaling_factor=0.18215), tmp / "vae")
        _save(UNet2DConditionModel(**SD15_UNET), tmp / "unet")
        vision = dict(VISION_L14)
        checker = StableDiffusionSafetyChecker(CLIPConfig(
            text_config=dict(SD15_CLIP, **ids), vision_config=vision, projection_dim=vision.pop("projection_dim")))
        _save(checker, tmp / "safety_checker")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps({"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", **SCHEDULER}, indent=2))
        (tmp / "feature_extractor").mkdir()
        (tmp / "feature_extractor" / "preprocessor_config.json").write_text(
            json.dumps({"feature_extractor_type": "CLIPFeatureExtractor", "image_processor_type": "CLIPImageProcessor",
                        **FEATURE_EXTRACTOR}, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return Path(output_dir)


def ensure_sd15_model(output_dir) -> float:
    """Build the folder unless it is there; the seconds it took (0 when it was there). In a process of its own: built
    here, the model's 5 GB would stay in the caller beside everything it runs next, and a child it forks would report
    them as its own peak (a forked child starts with its parent's RSS)."""
    output_dir = Path(output_dir)
    if (output_dir / "model_index.json").is_file():
        return 0.0
    start = time.perf_counter()
    build = f"from bench.sd15_model import build_sd15_model; build_sd15_model({str(output_dir)!r})"
    if subprocess.run([sys.executable, "-c", build]).returncode != 0:
        raise SystemExit(f"building the SD-1.5 folder in {output_dir} failed")
    return time.perf_counter() - start
