"""A Stable Diffusion pipeline around a UNet: its scheduler, its assembly from t2i's checked loaders, the EMA weights
swapped in for sampling, and the trained output folder."""

import contextlib
import json
import os
import shutil
from pathlib import Path

from t2i.io import atomic_dir, atomic_write_json


def last_model_file() -> Path:
    """Where t2i-train records its last output folder, the default --model of t2i-infer."""
    return Path(os.environ.get("T2I_HOME", Path.home() / ".cache" / "t2i")) / "last_model"


def load_scheduler(model_dir, class_name=None, prediction_type=None, **extra):
    """The folder's own scheduler, or `class_name` configured from the folder's scheduler config; `prediction_type`
    overrides the one in that config (a model trained for v_prediction samples with v_prediction)."""
    from mindone import diffusers

    config = diffusers.PNDMScheduler.load_config(str(model_dir), subfolder="scheduler")
    if prediction_type is not None:
        extra["prediction_type"] = prediction_type
    return getattr(diffusers, class_name or config["_class_name"]).from_config(config, **extra)


def load_parts(model_dir, dtype=None) -> dict:
    """The frozen components (VAE, text encoder, tokenizer) through t2i's checked loaders."""
    import mindspore as ms

    from t2i import models

    dtype = dtype or ms.float32
    tokenizer, text_encoder = models.load_text_encoder(model_dir, dtype=dtype)
    return {"vae": models.load_vae(model_dir, dtype=dtype), "text_encoder": text_encoder, "tokenizer": tokenizer}


def assemble(unet, scheduler, vae, text_encoder, tokenizer):
    """mindone's StableDiffusionPipeline from loaded parts; no safety checker (t2i samples for the person training)."""
    from mindone.diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def ema_weights(ema, params):
    """Within the block the parameters hold the EMA weights, afterwards their own again; ema None: no change."""
    import mindspore as ms

    if ema is None:
        yield
        return
    backup = [p.asnumpy() for p in params]
    ema.copy_to(params)
    try:
        yield
    finally:
        for p, value in zip(params, backup):
            p.set_data(ms.Tensor(value))


def save_pipeline(tr):
    """Make output_dir a diffusers pipeline: untouched components copied byte for byte, the trained (EMA) UNet."""
    cfg = tr.config
    out = Path(cfg.output_dir)
    src = Path(cfg.pretrained_model_name_or_path)
    for component in ("vae", "text_encoder", "tokenizer", "scheduler"):
        with atomic_dir(out / component) as tmp:
            shutil.copytree(src / component, tmp, dirs_exist_ok=True)
            if component == "scheduler" and tr.prediction_type != tr.base_prediction_type:
                config_file = tmp / "scheduler_config.json"
                sched = json.loads(config_file.read_text())
                sched["prediction_type"] = tr.prediction_type
                config_file.write_text(json.dumps(sched, indent=2))
    if tr.ema is not None:
        tr.ema.copy_to(tr.unet.trainable_params())
    with atomic_dir(out / "unet") as tmp:
        tr.unet.save_pretrained(str(tmp))
    index = json.loads((src / "model_index.json").read_text())
    atomic_write_json(out / "model_index.json", index)
    last = last_model_file()
    last.parent.mkdir(parents=True, exist_ok=True)
    last.write_text(str(out.resolve()))
