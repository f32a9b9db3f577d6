"""Export for tools outside t2i: a diffusers-layout Stable Diffusion or SDXL folder as one .safetensors file in the
original checkpoint layout (single-file), a t2i LoRA in kohya's single-file LoRA layout (kohya), or a t2i LoRA fused
into its base as a full pipeline folder (merged).

The single-file layout is the layout A1111 and ComfyUI load: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
`cond_stage_model.transformer.text_model.*` (OpenAI CLIP, SD 1.x) or `cond_stage_model.model.*` (OpenCLIP, SD 2.x),
named as diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py names them; SDXL's (the SGM checkpoints')
has its two text encoders under `conditioner.embedders.0.transformer.*` (CLIP-L) and `conditioner.embedders.1.model.*`
(OpenCLIP bigG) and its UNet's add_embedding as `label_emb`. The block numbering is worked out from each config rather
than fixed to SD's four blocks of two layers, so smaller models export too.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from t2i.core.atomic import atomic_file
from t2i.core.flags import DEVICE_TARGET_HELP, check, command, flag
from t2i.interop import tensorfile
from t2i.interop.hub import resolve_model

FORMATS = ("single-file", "kohya", "merged")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# The module holding each text encoder: SD's one; SDXL's CLIP-L and OpenCLIP bigG. Inside it, OpenAI CLIP is under
# `transformer.` (transformers' names), OpenCLIP under `model.` (open_clip's).
SD_TEXT_MODULES = ("cond_stage_model.",)
SDXL_TEXT_MODULES = ("conditioner.embedders.0.", "conditioner.embedders.1.")
# Inside a residual block: diffusers name -> original name.
UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
VAE_RESNET = {
    "norm1.": "norm1.", "conv1.": "conv1.", "norm2.": "norm2.", "conv2.": "conv2.", "conv_shortcut.": "nin_shortcut."
}
VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


@dataclass(frozen=True)
class ExportConfig:
    model: str = flag(help="A diffusers Stable Diffusion or SDXL folder, such as t2i-train's --output_dir, or a Hub "
                           "model id; for kohya and merged, a t2i LoRA output folder or its "
                           "pytorch_lora_weights.safetensors.")
    output: str = flag(help="The FILE.safetensors to write (merged: the folder).")
    format: str | None = flag(None, "single-file (default): one .safetensors in the original SD or SDXL layout (A1111, "
                                    "ComfyUI). kohya: a LoRA as one kohya-layout .safetensors (A1111, ComfyUI). "
                                    "merged: a LoRA fused into its base, written as a full pipeline folder.",
                              choices=FORMATS)
    merge_lora: bool = flag(False, "Same as --format merged.")
    base: str | None = flag(None, "kohya and merged: the LoRA's base pipeline folder or Hub model id (default: the "
                                  "one its t2i_train_config.json names).")
    revision: str | None = flag(None, "Branch, tag or commit of a Hub model id (--model or --base).")
    variant: str | None = flag(None, "Weights variant of --model or --base, e.g. fp16.")
    half: bool = flag(False, "Store float weights as float16, as most shared checkpoints are.")
    overwrite: bool = flag(False, "Replace --output if it exists.")
    device_target: str | None = flag(None, DEVICE_TARGET_HELP)

    def __post_init__(self):
        check(self)
        if self.merge_lora and self.format not in (None, "merged"):
            raise ValueError(f"--merge_lora is --format merged; it cannot go with --format {self.format}")
        object.__setattr__(self, "format", "merged" if self.merge_lora else self.format or "single-file")
        if self.format == "merged":
            if self.output.endswith(".safetensors") or self.half:
                raise ValueError(f"--output {self.output}: --format merged writes a pipeline folder (in the base's "
                                 "dtype, no --half); give a folder name")
        elif not self.output.endswith(".safetensors"):
            raise ValueError(f"--output {self.output}: --format {self.format} writes one FILE.safetensors")
        if self.base is not None and self.format == "single-file":
            raise ValueError("--base is only for --format kohya and merged")


def _rename(state, prefixes, component):
    """Swap each key's longest matching prefix; a key that no prefix covers is an error, never dropped."""
    ordered = sorted(prefixes.items(), key=lambda item: -len(item[0]))
    out = {}
    for key, value in state.items():
        for old, new in ordered:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            raise ValueError(f"{component} weight {key} has no place in the original Stable Diffusion layout")
    return out


def _resnet(prefixes, src, dst, parts):
    prefixes.update({src + a: dst + b for a, b in parts.items()})


def unet_to_ldm(state, config) -> dict:
    """diffusers UNet2DConditionModel names -> the original `model.diffusion_model.` names (without the prefix).

    The original numbers its blocks flat: input_blocks.0 is conv_in, then each down block's layers and its
    downsampler; output_blocks hold each up block's layers, the last one also the upsampler (after its attention,
    if the block type has one). SDXL's text_time add_embedding is the original's label_emb.
    """
    from mindone.diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    layers = config["layers_per_block"]
    per = layers + 1
    prefixes = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        prefixes.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    for i in range(len(config["block_out_channels"])):
        for j in range(layers):
            _resnet(prefixes, f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{1 + i * per + j}.0.", UNET_RESNET)
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{1 + i * per + j}.1."
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * per}.0.op."
        for j in range(per):
            _resnet(prefixes, f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * per + j}.0.", UNET_RESNET)
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * per + j}.1."
        after = 2 if "Attn" in config["up_block_types"][i] else 1
        prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * per + layers}.{after}."
    _resnet(prefixes, "mid_block.resnets.0.", "middle_block.0.", UNET_RESNET)
    prefixes["mid_block.attentions.0."] = "middle_block.1."
    _resnet(prefixes, "mid_block.resnets.1.", "middle_block.2.", UNET_RESNET)
    return _rename(state, prefixes, "unet")


def vae_to_ldm(state, config) -> dict:
    """diffusers AutoencoderKL names -> the original `first_stage_model.` names (without the prefix).

    The original numbers the decoder's up blocks from the lowest resolution upwards, the reverse of diffusers, and
    its mid-block attention projections are 1x1 convolutions where diffusers has linear layers.
    """
    from mindone.diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    n = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    prefixes = dict(DIFFUSERS_TO_LDM_MAPPING["vae"])
    for i in range(n):
        for j in range(layers):
            _resnet(prefixes, f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET)
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        for j in range(layers + 1):
            _resnet(prefixes, f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", VAE_RESNET)
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{n - 1 - i}.upsample.conv."
    for part in ("encoder", "decoder"):
        for k in range(2):
            _resnet(prefixes, f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.", VAE_RESNET)
        _resnet(prefixes, f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION)
    out = _rename(state, prefixes, "vae")
    for key, value in out.items():
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key):
            out[key] = value[:, :, None, None]
    return out


def clip_to_ldm(state, config, module=SD_TEXT_MODULES[0]) -> dict:
    """transformers CLIPTextModel(WithProjection) names -> the original names, under the text encoder's `module`.

    OpenAI CLIP (quick_gelu: SD 1.x's, SDXL's first) keeps the transformers names under `<module>transformer.`;
    OpenCLIP (gelu: SD 2.x's, SDXL's second) is stored in open_clip's own layout under `<module>model.`, with q/k/v
    fused into one in_proj per layer and the text projection as the matrix text @ projection multiplies by (the
    transpose of the Linear's weight).
    """
    if config["hidden_act"] != "gelu":
        return {f"{module}transformer.{k}": v for k, v in state.items()}
    from mindone.diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    mapping = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    prefix = module + "model."

    def rename(key):
        key = "transformer." + key
        for new, old in mapping["transformer"].items():
            key = key.replace(new, old)
        return prefix + key

    out, fused = {}, {}
    for key, value in state.items():
        qkv = re.fullmatch(r"(.+)\.self_attn\.([qkv])_proj\.(weight|bias)", key)
        if key == "text_projection.weight":
            out[prefix + mapping["layers"][key]] = value.T
        elif key in mapping["layers"]:
            out[prefix + mapping["layers"][key]] = value
        elif qkv:
            fused.setdefault((qkv[1], qkv[3]), {})[qkv[2]] = value
        else:
            out[rename(key)] = value
    for (layer, kind), parts in fused.items():
        out[f"{rename(layer)}.attn.in_proj_{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]])
    return out


def single_file_state(unet, vae, text_encoders) -> dict:
    """The loaded models (SD's one text encoder, SDXL's two) as one original-layout state dict of NumPy arrays."""
    from t2i.interop.models import pytorch_state_dict

    state = {UNET_PREFIX + k: v for k, v in unet_to_ldm(pytorch_state_dict(unet), unet.config).items()}
    state.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(pytorch_state_dict(vae), vae.config).items()})
    modules = SDXL_TEXT_MODULES if len(text_encoders) == 2 else SD_TEXT_MODULES
    for encoder, module in zip(text_encoders, modules, strict=True):
        state.update(clip_to_ldm(pytorch_state_dict(encoder), encoder.config.to_dict(), module))
    return state


def write_state(state: dict, output: Path, half: bool, metadata: dict):
    """One tensor at a time (tensorfile), fp32 written as fp16 with `half`: all of an SD-1.5 state as bytes at once
    took export's peak to 13.1 GB."""
    with atomic_file(output) as tmp:
        tensorfile.save(state, tmp, metadata=metadata, dtype=np.float16 if half else None)


def export_single_file(config: ExportConfig, output: Path):
    from t2i.core import runtime
    from t2i.interop import models

    runtime.setup(config.device_target)
    model_dir = resolve_model(config.model, "--model", ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                                                       "tokenizer_2"), config.revision, config.variant)
    variant = config.variant
    state = single_file_state(models.load_unet(model_dir, variant=variant), models.load_vae(model_dir, variant=variant),
                              models.TextEncoders.load(model_dir, variant=variant).encoders)
    write_state(state, output, config.half, {"format": "pt"})


def sgm_paths(layers, unet_config) -> dict:
    """Each UNet module path (diffusers') -> its path in the original (SGM) UNet: unet_to_ldm's name for its
    weight."""
    renamed = unet_to_ldm({f"{layer}.weight": layer for layer in layers}, unet_config)
    return {layer: key.removesuffix(".weight") for key, layer in renamed.items()}


def kohya_paths(config: ExportConfig, state) -> dict | None:
    """How kohya names the adapter's layers, which its base decides: None (their diffusers paths) for SD 1.x/2.x,
    which kohya's sd-scripts train as diffusers UNets; sgm_paths for SDXL, which they train as the original UNet. A
    LoRA whose cross-attention width is not its base's is refused: another base's."""
    from t2i.interop import models

    base = lora_base(config, components=("unet",))
    unet_config = json.loads((base.folder / "unet" / "config.json").read_text())
    width = unet_config["cross_attention_dim"]
    odd = {v.shape[1] for k, v in state.items() if re.search(r"\.attn2\.to_[kv]\.lora_A\.weight$", k)} - {width}
    if odd:
        raise ValueError(f"--model {config.model}: its layers take {odd.pop()}-wide text states, its base "
                         f"{base.name} has {width}: a LoRA for another base; pass its own with --base")
    layers = [k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")]
    return sgm_paths(layers, unet_config) if models.family(base.folder) == "sdxl" else None


def export_kohya(config: ExportConfig, output: Path):
    """The adapter in kohya's layout (layer names as kohya_paths decides), with the `ss_network_*` metadata kohya's
    scripts write."""
    from t2i.interop import lora

    file = lora.weight_file(config.model, flag="--model")
    state, meta = lora.read_adapter(file, flag="--model")
    state = lora.to_kohya(state, meta, source=f"--model {file}", paths=kohya_paths(config, state))
    downs = [v for k, v in state.items() if k.endswith(".lora_down.weight")]
    alphas = {float(v) for k, v in state.items() if k.endswith(".alpha")}
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(downs[0].shape[0]),
            "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic"}
    write_state(state, output, config.half, meta)


@dataclass(frozen=True)
class LoraBase:
    name: str  # as given: --base, or the pretrained_model_name_or_path of the LoRA's training config
    folder: Path  # resolved (a Hub id's snapshot)
    variant: str | None
    trained: dict | None  # the LoRA's t2i_train_config.json, when found


def lora_base(config: ExportConfig, components=None) -> LoraBase:
    """--base, or the base model the LoRA folder's (or, for a checkpoint-N, its parent's) training config names,
    resolved with `components` (default: all)."""
    from t2i.interop.pipeline import CONFIG_NAME

    folder = Path(config.model) if Path(config.model).is_dir() else Path(config.model).parent
    found = [c for c in (folder / CONFIG_NAME, folder.parent / CONFIG_NAME) if c.is_file()]
    trained = json.loads(found[0].read_text()) if found else None
    if config.base is not None:
        return LoraBase(config.base, resolve_model(config.base, "--base", components, config.revision,
                                                   config.variant), config.variant, trained)
    if trained is None:
        raise ValueError(f"--model {config.model}: no {CONFIG_NAME} beside it names the LoRA's base, which "
                         f"--format {config.format} needs; pass --base BASE_MODEL")
    name, variant = trained["pretrained_model_name_or_path"], trained.get("variant")
    return LoraBase(name, resolve_model(name, f"--base (from {found[0]})", components, trained.get("revision"),
                                        variant), variant, trained)


def export_merged(config: ExportConfig, output: Path):
    """The base pipeline with the adapter fused into its UNet (peft's merge through mindone's fuse_lora, then the LoRA
    layers removed), in the layout a full training run writes, with a model card. Only the UNet is loaded: the other
    components are copied from the base."""
    from t2i.core import runtime
    from t2i.core.atomic import atomic_dir
    from t2i.interop import lora, models, pipeline
    from t2i.interop.modelcard import write_merged_card

    runtime.setup(config.device_target)
    file = lora.weight_file(config.model, flag="--model")
    base = lora_base(config)
    unet = models.load_unet(base.folder, variant=base.variant)
    (name,) = lora.apply(unet, [(file, 1.0)], flag="--model")
    about = lora.describe(unet.peft_config[name])
    unet.fuse_lora()
    unet.unload_lora()
    with atomic_dir(output) as tmp:
        pipeline.write_pipeline(unet, base.folder, tmp, variant=base.variant)
        write_merged_card(tmp, base_model=base.name, adapter=str(file), lora=about, config=base.trained)


def run(config: ExportConfig) -> Path:
    output = Path(config.output)
    if output.exists() and not config.overwrite:
        raise FileExistsError(f"--output {output} exists; pass --overwrite to replace it")
    {"single-file": export_single_file, "kohya": export_kohya, "merged": export_merged}[config.format](config, output)
    return output


def _export(config: ExportConfig):
    click.echo(f"wrote {run(config)}")


cli = command(ExportConfig, _export, "Export a diffusers-layout Stable Diffusion or SDXL folder or a t2i LoRA for "
              "tools that load original SD checkpoints.")
