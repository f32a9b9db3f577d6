"""The PyTorch side of tests/test_lora.py, run by .venv-peer's Python (torch, diffusers, peft; no MindSpore, no t2i):
load a t2i LoRA into the base pipeline as a PyTorch user would (`pipe.load_lora_weights(folder)`), and print one JSON
line with the adapter keys PyTorch's peft-injected UNet has (for the file's LoraConfig), the keys of the file, the keys
whose loaded values differ from the file's, and the LoRA scale PyTorch applies; the UNet output on INPUTS (an .npz of
sample, timestep, encoder_hidden_states) goes to OUTPUT (.npy). With KOHYA, a kohya-layout file of the same adapter
(t2i-export --format kohya) is loaded the same way into a second adapter, reported under "kohya" (its adapter keys,
those whose values differ from the diffusers file's once loaded, its scales, and what diffusers and peft warned while
loading it), and the UNet output with it alone goes to OUTPUT with a -kohya suffix.

Usage: .venv-peer/bin/python tests/peer_lora.py BASE LORA_FOLDER INPUTS OUTPUT [KOHYA]
"""

import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def main(base, folder, inputs, output, kohya=None):
    file = Path(folder) / WEIGHT_NAME
    with safe_open(str(file), framework="pt") as f:
        config = {k.removeprefix("unet."): v for k, v in json.loads(f.metadata()["lora_adapter_metadata"]).items()}
    stored = {k.removeprefix("unet."): v for k, v in load_file(str(file)).items()}
    fresh = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    fresh.add_adapter(LoraConfig(r=config["r"], lora_alpha=config.get("lora_alpha", config["r"]),
                                 target_modules=config["target_modules"]))
    expected = sorted(get_peft_model_state_dict(fresh))

    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(folder, weight_name=WEIGHT_NAME, adapter_name="t2i")  # offline, diffusers needs the name
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="t2i")
    differ = sorted(k for k in stored if k not in loaded or not torch.equal(loaded[k], stored[k]))
    data = np.load(inputs)
    report = {"expected": expected, "stored": sorted(stored), "differ": differ, "scales": scales_of(pipe, "t2i")}
    np.save(output, unet_output(pipe, data))
    if kohya is not None:
        warned = []
        handler = logging.Handler()
        handler.emit = lambda record: warned.append(record.getMessage())
        logging.getLogger("diffusers").addHandler(handler)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(Path(kohya).parent), weight_name=Path(kohya).name, adapter_name="kohya")
        logging.getLogger("diffusers").removeHandler(handler)
        from_kohya = get_peft_model_state_dict(pipe.unet, adapter_name="kohya")
        report["kohya"] = {
            "keys": sorted(from_kohya),
            "differ": sorted(k for k in loaded if k not in from_kohya or not torch.equal(from_kohya[k], loaded[k])),
            "scales": scales_of(pipe, "kohya"),
            "warnings": warned + [str(w.message) for w in caught],
        }
        pipe.set_adapters("kohya")
        np.save(str(output).removesuffix(".npy") + "-kohya.npy", unet_output(pipe, data))
    print(json.dumps(report))


def scales_of(pipe, adapter):
    return sorted({m.scaling[adapter] for m in pipe.unet.modules() if hasattr(m, "scaling") and adapter in m.scaling})


def unet_output(pipe, data):
    with torch.no_grad():
        return pipe.unet(torch.from_numpy(data["sample"]), torch.from_numpy(data["timestep"]),
                         torch.from_numpy(data["encoder_hidden_states"]), return_dict=False)[0].numpy()


if __name__ == "__main__":
    main(*sys.argv[1:6])
