"""Stage 3: sample from a trained pipeline with mindone's StableDiffusionPipeline and write PNGs (or latents)."""

import contextlib
import dataclasses
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from t2i.core.atomic import atomic_write_bytes
from t2i.core.flags import DEVICE_TARGET_HELP, check, command, flag
from t2i.interop.lora import WEIGHT_NAME, parse_lora_arg
from t2i.interop.pipeline import SCHEDULERS, load_scheduler
from t2i.interop.prompts import pipeline_prompt_args


@dataclass(frozen=True)
class InferConfig:
    prompt: tuple = flag(help="The prompt; repeat the flag for several.")
    negative_prompt: str | None = flag(None)
    model: str | None = flag(None, "Pipeline folder or Hub model id (default: the output of the last t2i-train).")
    revision: str | None = flag(None, "Branch, tag or commit of a Hub model id.")
    variant: str | None = flag(None, "Weights variant, e.g. fp16.")
    num_inference_steps: int = flag(30, min=1)
    guidance_scale: float = flag(7.5)
    height: int | None = flag(None, "Default: the model's.", multiple_of=8)
    width: int | None = flag(None, "Default: the model's.", multiple_of=8)
    num_images_per_prompt: int = flag(1, min=1)
    seed: int = flag(0, "Same seed, same image.")
    scheduler: str | None = flag(None, "Default: the model's.", choices=tuple(SCHEDULERS))
    mixed_precision: str = flag("no", choices=("no", "fp16", "bf16"))
    output: str = flag("t2i-outputs", "A .png/.npy file (one image) or a folder.")
    output_type: str = flag("pil", "latent writes the final latents as .npy instead of decoding them.",
                            choices=("pil", "latent"))
    overwrite: bool = flag(False, "Replace existing output files.")
    jit: bool = flag(False, "Run the UNet as one compiled graph (ms.jit): faster denoising steps after a one-off "
                            "compile (~7 s for the tiny model on CPU); pays off from ~100 UNet calls.")
    lora: tuple = flag((), "A LoRA (t2i output folder, diffusers or kohya .safetensors) applied at SCALE (default 1); "
                           "repeatable.", metavar="PATH[:SCALE]")
    prompt_weighting: bool = flag(True, "Read A1111's weighting syntax, (word:1.3) (word) [word], and encode prompts "
                                        "past 77 tokens in 75-token chunks (t2i.interop.prompts); "
                                        "--no_prompt_weighting passes the text to the pipeline unchanged.")
    device_target: str | None = flag(None, DEVICE_TARGET_HELP)

    @property
    def loras(self) -> list:
        return [parse_lora_arg(arg) for arg in self.lora]

    def __post_init__(self):
        check(self)
        if not self.prompt:
            raise ValueError("--prompt is required (repeat it for several prompts)")
        for path, scale in self.loras:
            if not np.isfinite(scale):
                raise ValueError(f"--lora {path}: scale must be a finite number, got {scale}")


def choose_model(model, loras=(), revision=None, variant=None):
    """(pipeline folder, [(adapter path, scale)]): --model (a folder or a Hub model id) and --lora, or the output of
    the last `t2i-train` run on this machine (after a LoRA run: its base and its adapter at scale 1, unless --lora
    names the adapters)."""
    from t2i.interop import hub
    from t2i.interop.pipeline import SAMPLING_COMPONENTS, last_model_file, read_last_model

    loras = list(loras)
    if model is None:
        last = read_last_model()
        if last is None:
            raise ValueError(f"no --model given and no trained model recorded in {last_model_file()}; run t2i-train "
                             "or pass --model")
        model, adapter = last
        if adapter is not None and not loras:
            loras = [(adapter, 1.0)]
    if hub.is_hub_id(model):
        return hub.resolve_model(model, "--model", SAMPLING_COMPONENTS, revision, variant), loras
    path = Path(model)
    if not (path / "model_index.json").is_file():
        hint = f"; it holds a LoRA: pass its base as --model and --lora {path}" if (path / WEIGHT_NAME).is_file() else ""
        raise ValueError(f"--model: {path} is not a diffusers pipeline folder (no model_index.json){hint}")
    return path, loras


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:limit] or "image"


def output_paths(config: InferConfig) -> list:
    """One path per image, decided before any sampling so that a refusal costs nothing."""
    ext = ".npy" if config.output_type == "latent" else ".png"
    total = len(config.prompt) * config.num_images_per_prompt
    out = Path(config.output)
    if out.suffix.lower() in (".png", ".npy"):
        if total != 1:
            raise ValueError(f"--output {out} is a single file but {total} images were asked for; give a folder")
        if out.suffix.lower() != ext:
            raise ValueError(f"--output {out}: --output_type {config.output_type} writes {ext} files")
        paths = [out]
    else:
        paths = [out / f"{slug(p)}-s{config.seed}-{i}{ext}" for p in config.prompt
                 for i in range(config.num_images_per_prompt)]
    if not config.overwrite:
        existing = [p for p in paths if p.exists()]
        if existing:
            raise ValueError(f"--output: {existing[0]} exists; pass --overwrite to replace it")
    return paths


def load_pipeline(model: Path, config: InferConfig):
    """The pipeline from t2i's loaders, which read Hub layouts (.bin, flat CLIP keys) and refuse random weights."""
    from t2i.interop import models, pipeline

    dtype = models.DTYPES[config.mixed_precision]
    return pipeline.assemble(models.load_unet(model, variant=config.variant, dtype=dtype),
                             choose_scheduler(model, config), **pipeline.load_parts(model, dtype, config.variant))


def choose_scheduler(model: Path, config: InferConfig):
    """The folder's own scheduler, or the --scheduler choice configured from the folder's scheduler config."""
    return load_scheduler(model, config.scheduler)


def run(config: InferConfig) -> list:
    """Sample every prompt; returns the written paths. Each prompt's generator is seeded alone, so the same
    prompt and seed give the same image whatever other prompts are in the call."""
    from t2i.core import runtime
    from t2i.interop import lora, models

    if runtime.setup(config.device_target) == "CPU" and config.mixed_precision == "bf16":
        raise ValueError("--mixed_precision bf16: MindSpore's CPU backend has no bf16 kernels for the schedulers' "
                         "arithmetic; use no or fp16 on CPU")
    print(json.dumps(dataclasses.asdict(config), indent=2))
    model, loras = choose_model(config.model, config.loras, config.revision, config.variant)
    paths = iter(output_paths(config))
    pipe = load_pipeline(model, config)
    lora.apply(pipe.unet, loras, pipe.text_encoder)
    written = []
    with models.compiled(pipe.unet) if config.jit else contextlib.nullcontext():
        for prompt in config.prompt:
            result = pipe(
                **pipeline_prompt_args(pipe, prompt, config.negative_prompt, config.prompt_weighting),
                height=config.height,
                width=config.width,
                num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale,
                num_images_per_prompt=config.num_images_per_prompt,
                generator=np.random.default_rng(config.seed),
                output_type=config.output_type,
            )[0]
            for image in result[: config.num_images_per_prompt]:
                path = next(paths)
                buf = io.BytesIO()
                if config.output_type == "latent":
                    np.save(buf, image.float().asnumpy())
                else:
                    image.save(buf, format="PNG")
                atomic_write_bytes(path, buf.getvalue())
                print(f"wrote {path}")
                written.append(path)
    return written


cli = command(InferConfig, lambda config: run(config), "Generate images from a trained Stable Diffusion pipeline.")
