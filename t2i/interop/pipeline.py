"""A Stable Diffusion pipeline around a UNet: its scheduler, its assembly from t2i's checked loaders, the EMA weights
swapped in for sampling, and the trained output folder (with the training config saved beside it as CONFIG_NAME)."""

import contextlib
import json
import os
import shutil
from pathlib import Path

from t2i.core.atomic import atomic_dir, atomic_write_bytes

# t2i-train saves its config beside the pipeline under a name no diffusers or transformers loader reads.
CONFIG_NAME = "t2i_train_config.json"


def last_model_file() -> Path:
    """Where t2i-train records its last output, the default of t2i-infer: the pipeline folder on the first line and,
    after a LoRA run, the adapter folder on the second."""
    return Path(os.environ.get("T2I_HOME", Path.home() / ".cache" / "t2i")) / "last_model"


def record_last_model(model, lora=None):
    last = last_model_file()
    last.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(last, "\n".join(str(Path(p).resolve()) for p in (model, lora) if p is not None).encode())


def read_last_model():
    """(pipeline folder, adapter folder or None) of the last t2i-train run, or None when there was none."""
    record = last_model_file()
    if not record.is_file():
        return None
    lines = record.read_text().splitlines()
    return Path(lines[0].strip()), Path(lines[1].strip()) if len(lines) > 1 else None


# --scheduler names (t2i-infer) -> mindone scheduler class and the settings that make it that sampler.
SCHEDULERS = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def load_scheduler(model_dir, name=None, prediction_type=None):
    """The folder's own scheduler, or the SCHEDULERS entry `name` configured from the folder's scheduler config;
    `prediction_type` overrides the one in that config (a model trained for v_prediction samples with v_prediction)."""
    from mindone import diffusers

    config = diffusers.PNDMScheduler.load_config(str(model_dir), subfolder="scheduler")
    class_name, extra = SCHEDULERS[name] if name is not None else (config["_class_name"], {})
    if prediction_type is not None:
        extra = {**extra, "prediction_type": prediction_type}
    return getattr(diffusers, class_name).from_config(config, **extra)


# What sampling loads of a pipeline folder (no safety checker): what a Hub id is resolved with for infer and LoRA
# (the `_2` ones where the folder has them: SDXL).
SAMPLING_COMPONENTS = ("unet", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def load_parts(model_dir, dtype=None, variant=None) -> dict:
    """The frozen components (VAE, text encoders, tokenizers) through t2i's checked loaders, as `assemble` takes
    them."""
    import mindspore as ms

    from t2i.interop import models

    dtype = dtype or ms.float32
    text = models.TextEncoders.load(model_dir, variant=variant, dtype=dtype)
    parts = {"vae": models.load_vae(model_dir, variant=variant, dtype=dtype), "text_encoder": text.encoders[0],
             "tokenizer": text.tokenizers[0]}
    if text.sdxl:
        parts.update(text_encoder_2=text.encoders[1], tokenizer_2=text.tokenizers[1],
                     force_zeros_for_empty_prompt=models.force_zeros_for_empty_prompt(model_dir))
    return parts


def assemble(unet, scheduler, vae, text_encoder, tokenizer, text_encoder_2=None, tokenizer_2=None,
             force_zeros_for_empty_prompt=True):
    """mindone's StableDiffusionPipeline, or with a second text encoder its StableDiffusionXLPipeline, from loaded
    parts; no safety checker or watermark (t2i samples for the person training)."""
    from mindone.diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if text_encoder_2 is not None:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                                         add_watermarker=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@contextlib.contextmanager
def ema_weights(ema, params):
    """Within the block the parameters hold the EMA weights, afterwards their own again; ema None: no change."""
    import mindspore as ms
    from mindspore import ops

    if ema is None:
        yield
        return
    # A copy: asnumpy() of a parameter the compiled optimizer updates can be a view of its live buffer.
    backup = [p.asnumpy().copy() for p in params]
    ema.copy_to(params)
    try:
        yield
    finally:
        for p, value in zip(params, backup):
            ops.assign(p, ms.Tensor(value))


def components_to_copy(model_dir) -> list:
    """The component folders model_dir's model_index.json names, but the UNet ([null, null] entries name none); one that
    is not there is an error."""
    from t2i.interop import models

    model_dir = Path(model_dir)
    names = [name for name in models.pipeline_components(model_dir) if name != "unet"]
    absent = [name for name in names if not (model_dir / name).is_dir()]
    if absent:
        raise ValueError(f"{model_dir}: model_index.json names {', '.join(absent)} but there is no such folder; "
                         "copy it in from the original model or set its entry to [null, null]")
    return names


def _checked_loaders(variant=None) -> dict:
    """The components whose weights t2i can load under any names, and so rewrite under PyTorch's."""
    from t2i.interop import models

    return {"text_encoder": lambda d: models.load_text_encoder(d, variant=variant)[1],
            "text_encoder_2": lambda d: models.load_text_encoder(d, variant=variant, component="text_encoder_2")[1],
            "vae": lambda d: models.load_vae(d, variant=variant),
            "safety_checker": lambda d: models.load_safety_checker(d, variant=variant)}


def _copy_component(src, out, name, loader, prediction_type, variant=None):
    """src/name into out/name atomically: byte for byte, except weights PyTorch would not load as they are (mindone's
    MindSpore names, for one), which are loaded through t2i's checked loader and written under PyTorch names."""
    from t2i.interop import models

    folder = src / name
    with atomic_dir(out / name) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        if name == "scheduler" and prediction_type is not None:
            config_file = tmp / "scheduler_config.json"
            sched = json.loads(config_file.read_text())
            sched["prediction_type"] = prediction_type
            config_file.write_text(json.dumps(sched, indent=2))
        if loader is None or models.loads_in_pytorch(folder, name, variant):
            return
        files = models.weight_files(folder, name, variant)
        dtype = models.stored_dtype(files)
        for stale in files + [folder / f"{weights}.index.json" for weights in models.WEIGHT_NAMES[name]]:
            (tmp / stale.name).unlink(missing_ok=True)
        models.save_pytorch_weights(loader(src), tmp / models.WEIGHT_NAMES[name][0], dtype=dtype)


def write_components(src, out, prediction_type=None, variant=None):
    """Every component src's model_index.json names but the UNet, then the index itself, into out; `prediction_type`
    replaces the scheduler's; `variant` names the weights read. A named folder src lacks is an error before anything
    is written."""
    src, out = Path(src), Path(out)
    names = components_to_copy(src)
    loaders = _checked_loaders(variant)
    for name in names:
        _copy_component(src, out, name, loaders.get(name), prediction_type, variant)
    atomic_write_bytes(out / "model_index.json", (src / "model_index.json").read_bytes())


def save_output(unet, base, out, lora_config=None, prediction_type=None, variant=None):
    """Make `out` what t2i-train leaves: a pipeline PyTorch and mindone diffusers load (the UNet and every other
    component of the pipeline folder `base`, write_pipeline), or with a LoRA the adapter alone; and record it as the
    default of t2i-infer. `prediction_type`: the scheduler's, when training changed it."""
    from t2i.interop import lora

    if lora_config is not None:
        lora.save_adapter(unet, lora_config, out)
        record_last_model(base, out)
        return
    write_pipeline(unet, base, out, prediction_type=prediction_type, variant=variant)
    record_last_model(out)


def write_pipeline(unet, base, out, prediction_type=None, variant=None):
    """`unet` and every other component of the pipeline folder `base` (write_components) into out."""
    # mindone's diffusers models save under PyTorch names already (its transformers models do not).
    with atomic_dir(Path(out) / "unet") as tmp:
        unet.save_pretrained(str(tmp))
    write_components(base, out, prediction_type=prediction_type, variant=variant)
