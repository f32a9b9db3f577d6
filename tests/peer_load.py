"""The PyTorch side of tests/test_output_pipeline.py, run by .venv-peer's Python (torch, diffusers, transformers; no
MindSpore, no t2i): load a pipeline folder as a PyTorch user would, with no overrides, sample 2 steps, and print one
JSON line with the image shape and each weighted component's missing and unexpected keys.

Usage: .venv-peer/bin/python tests/peer_load.py FOLDER SIZE
"""

import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPTextModel

CLASSES = {"text_encoder": CLIPTextModel, "unet": UNet2DConditionModel, "vae": AutoencoderKL,
           "safety_checker": StableDiffusionSafetyChecker}


def main(folder, size):
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    result = pipe("a red circle", num_inference_steps=2, height=size, width=size, output_type="np",
                  generator=torch.Generator().manual_seed(0))
    keys = {}
    for name, cls in CLASSES.items():
        if (Path(folder) / name).is_dir():
            _, info = cls.from_pretrained(folder, subfolder=name, output_loading_info=True)
            keys[name] = {"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"])}
    components = {name: type(part).__name__ for name, part in pipe.components.items() if part is not None}
    print(json.dumps({"image_shape": list(result.images.shape), "components": components, "keys": keys}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
