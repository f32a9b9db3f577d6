"""The loop section's model folders: the bench's tiny model with its UNet swapped for each other geometry
(LOOP_GEOMETRIES), made by inputs.prepare and trained by loop.py."""

import shutil

from bench import LOOP_GEOMETRIES


def loop_model(base, dest, unet_overrides):
    """`base` (a t2i tiny model folder) with its UNet replaced by a random one of another geometry; the VAE and the
    text encoder are base's, so base's latent stores train it."""
    import json

    from mindone.diffusers import UNet2DConditionModel

    from t2i.interop.models import save_pretrained_pytorch

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(base, dest)
    shutil.rmtree(dest / "unet")
    config = {k: v for k, v in json.loads((base / "unet" / "config.json").read_text()).items()
              if not k.startswith("_")}
    save_pretrained_pytorch(UNet2DConditionModel(**{**config, **unet_overrides}), dest / "unet")
    return dest


def loop_model_dirs(work):
    """geometry name -> model folder: the bench's tiny model for t2i's own geometry, a folder made from it for each
    other (inputs.prepare makes them)."""
    return {name: work / (f"tiny-model-{name}" if overrides else "tiny-model")
            for name, overrides in LOOP_GEOMETRIES.items()}


def make_loop_models(work):
    for name, folder in loop_model_dirs(work).items():
        if LOOP_GEOMETRIES[name]:
            loop_model(work / "tiny-model", folder, LOOP_GEOMETRIES[name])
