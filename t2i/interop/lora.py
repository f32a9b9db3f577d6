"""LoRA adapters on the UNet through mindone's own machinery (mindone.peft's LoraConfig and the diffusers models'
`add_adapter`, `get_peft_model_state_dict`, the pipelines' `save_lora_weights` / `load_lora_weights` / `set_adapters`),
as mindone's examples/diffusers/text_to_image/train_text_to_image_lora.py uses it.

The adapter file is diffusers' `pytorch_lora_weights.safetensors` under PEFT names (`unet.<module>.lora_A.weight`,
`lora_B`) with the LoraConfig in its `lora_adapter_metadata`, so a --lora_alpha other than the rank loads with the
right scale in mindone and PyTorch diffusers alike. `to_kohya` rewrites it in kohya sd-scripts' single-file layout
(`lora_unet_<module path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`; for SDXL the original UNet's module
path, as kohya's SDXL files), which A1111, ComfyUI and mindone's own non-diffusers converter read.
"""

import re
from pathlib import Path

import numpy as np

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
KOHYA_PREFIX = "lora_unet_"
METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the LoraConfig in the file


def targets(target_modules: str) -> tuple:
    """--lora_target_modules 'to_q,to_k' -> ('to_q', 'to_k')."""
    return tuple(t.strip() for t in target_modules.split(",") if t.strip())


def check_lora_flags(rank, alpha, target_modules, dropout):
    """TrainConfig's LoRA flags: ValueError naming the flag when one is out of range."""
    if rank is None:
        if alpha is not None or dropout:
            raise ValueError("--lora_alpha and --lora_dropout need --lora_rank")
        return
    if rank < 1 or alpha <= 0:
        raise ValueError(f"--lora_rank and --lora_alpha must be positive, got {rank} and {alpha}")
    if not 0 <= dropout < 1:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {dropout}")
    if not targets(target_modules):
        raise ValueError("--lora_target_modules must name UNet layers, comma-separated (e.g. to_q,to_k,to_v,to_out.0)")


def add_adapters(unet, rank, alpha, target_modules, dropout):
    """Inject one trainable LoRA adapter ("default") into the UNet's target modules (mindone.peft freezes every other
    weight); returns its LoraConfig. Gaussian init of A and zero B, as mindone's and diffusers' LoRA scripts: the
    untrained adapter leaves the UNet's output unchanged."""
    from mindone.peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules),
                        lora_dropout=dropout)
    unet.add_adapter(config)
    if not unet.trainable_params():
        raise ValueError(f"--lora_target_modules {','.join(target_modules)} matched no layer of the UNet")
    return config


def cast_frozen(unet, dtype):
    """The frozen base weights in `dtype` (half the memory in fp16); the adapter stays fp32, its master weights."""
    for p in unet.get_parameters():
        if not p.requires_grad and p.dtype != dtype:
            p.set_dtype(dtype)


def adapter_state(unet) -> dict:
    """The adapter's weights under PEFT names without the adapter name (`<module>.lora_A.weight`), as numpy fp32."""
    from mindone.peft import get_peft_model_state_dict

    return {k: np.asarray(v.float().asnumpy(), dtype=np.float32) for k, v in get_peft_model_state_dict(unet).items()}


def set_adapter_state(unet, state: dict, source):
    """Load `state` (adapter_state's names, optionally `unet.`-prefixed) into the adapter being trained; any name
    missing on either side is an error naming `source`."""
    import mindspore as ms

    params = {name.replace(".default.", "."): p for name, p in unet.parameters_and_names() if ".default." in name}
    state = {k.removeprefix("unet."): v for k, v in state.items()}
    if set(state) != set(params):
        odd = sorted(set(state) ^ set(params))
        raise ValueError(f"{source}: adapter names differ from this run's LoRA layers ({len(odd)} differ, e.g. "
                         f"{odd[0]}); resume with the --lora_* settings it was trained with")
    for name, p in params.items():
        p.set_data(ms.Tensor(state[name], p.dtype))


def save_adapter(unet, lora_config, directory):
    """Write directory/pytorch_lora_weights.safetensors (diffusers layout) atomically."""
    import mindspore as ms
    from mindone.diffusers import StableDiffusionPipeline

    from t2i.core.atomic import atomic_file

    path = Path(directory) / WEIGHT_NAME
    state = {k: ms.Tensor(v) for k, v in adapter_state(unet).items()}
    with atomic_file(path) as tmp:
        StableDiffusionPipeline.save_lora_weights(str(tmp.parent), unet_lora_layers=state, safe_serialization=True,
                                                  weight_name=tmp.name, unet_lora_adapter_metadata=metadata(lora_config))
    return path


def metadata(lora_config) -> dict:
    """The LoraConfig fields diffusers' loaders read back into a LoraConfig (PyTorch's peft refuses unknown ones)."""
    keep = ("r", "lora_alpha", "target_modules", "lora_dropout", "init_lora_weights", "use_rslora", "use_dora",
            "lora_bias", "rank_pattern", "alpha_pattern", "bias", "peft_type")
    d = lora_config.to_dict()
    d = {k: d[k] for k in keep if k in d}
    if isinstance(d.get("target_modules"), set):
        d["target_modules"] = sorted(d["target_modules"])
    d["peft_type"] = str(d.get("peft_type", "LORA")).split(".")[-1]
    return d


# ---- infer: --lora PATH[:SCALE] ----------------------------------------------------------------------------------

def parse_lora_arg(arg: str):
    """'PATH[:SCALE]' -> (Path, float scale, 1.0 when absent)."""
    match = re.fullmatch(r"(.+?)(?::([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))?", arg)
    return Path(match.group(1)), float(match.group(2)) if match.group(2) is not None else 1.0


def weight_file(path, flag="--lora") -> Path:
    """The adapter file of a `flag` PATH: a t2i LoRA output (or checkpoint) folder, or the safetensors file itself."""
    path = Path(path)
    file = path / WEIGHT_NAME if path.is_dir() else path
    if not file.is_file() or file.suffix != ".safetensors":
        raise ValueError(f"{flag} {path}: no {WEIGHT_NAME} there; pass a t2i LoRA output folder or a diffusers or "
                         "kohya .safetensors LoRA file")
    return file


def _read(file):
    """(every tensor of a LoRA safetensors file as numpy, its LoRA config metadata or None): the one read of the file."""
    import json

    from safetensors import safe_open

    with safe_open(str(file), framework="np") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, json.loads(raw) if raw else None


def read_adapter(file, flag="--lora"):
    """(UNet LoRA weights under PEFT names without `unet.`, as numpy; the file's LoraConfig fields, {} if none) of a
    diffusers LoRA file."""
    state, meta = _read(file)
    state = {k.removeprefix("unet."): v for k, v in state.items()}
    odd = [k for k in state if not re.fullmatch(r"(?!text_encoder).+\.lora_[AB]\.weight", k)]
    if odd:
        raise ValueError(f"{flag} {file}: {odd[0]} is not a diffusers UNet LoRA weight (unet.<layer>.lora_A/B.weight)")
    return state, {k.removeprefix("unet."): v for k, v in (meta or {}).items()}


def to_kohya(state, meta, source, paths=None) -> dict:
    """read_adapter's weights and config -> kohya sd-scripts' layout: per layer lora_down (= A), lora_up (= B) and a
    scalar alpha, kohya's scale being alpha / lora_down's rows as PEFT's is lora_alpha / r. A file without a LoRA config
    has alpha = rank, as diffusers loads it. Layers are named by their diffusers module paths, as kohya names SD 1.x/2.x
    layers, or by `paths` (each layer's diffusers path -> the path kohya names it by: SDXL's original-UNet paths,
    `input_blocks_4_1_...`, t2i.export.sgm_paths)."""
    if meta.get("use_rslora") or meta.get("use_dora") or meta.get("alpha_pattern"):
        raise ValueError(f"{source}: rsLoRA, DoRA or per-layer alphas have no kohya equivalent; export a plain LoRA")
    out = {}
    for key, down in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        layer = key.removesuffix(".lora_A.weight")
        name = KOHYA_PREFIX + (layer if paths is None else paths[layer]).replace(".", "_")
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = state[f"{layer}.lora_B.weight"]
        out[f"{name}.alpha"] = np.asarray(meta.get("lora_alpha", down.shape[0]), dtype=down.dtype)
    return out


def read_lora(file, unet, flag="--lora"):
    """(state dict as mindone's lora_state_dict gives it -- diffusers names, a kohya file's converted --, the kohya
    alphas or None, the file's LoraConfig metadata or None) of a diffusers or kohya LoRA file for `unet`."""
    import mindspore as ms
    from mindone.diffusers import StableDiffusionPipeline

    state, meta = _read(file)
    # Parameters, as mindone's own load_file gives them: its loaders' load_param_into_net refuses Tensors.
    state = {k: ms.Parameter(v, name=k) for k, v in state.items()}
    try:
        state, alphas = StableDiffusionPipeline.lora_state_dict(state, unet_config=unet.config)
    except ValueError as e:
        raise ValueError(f"{flag} {file}: not a LoRA file mindone reads ({str(e).strip().splitlines()[-1]})") from e
    return state, alphas, meta


def check_fits(unet, state, file, flag="--lora"):
    """Every UNet LoRA weight of `state` (read_lora's) must name a layer of `unet` and match its shape: a LoRA of
    another base geometry is refused before anything is loaded."""
    from mindone.diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    layers = dict(unet.cells_and_names())
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if not unet_state:
        raise ValueError(f"{flag} {file}: no UNet LoRA weights (keys 'unet.*.lora_A.weight' or 'lora_unet_*') in it")
    if not any("lora_A" in k for k in unet_state):  # as load_lora_adapter converts them
        unet_state = convert_unet_state_dict_to_peft(unet_state)
    for key, value in unet_state.items():
        shape = tuple(value.shape)
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", key)
        layer = layers.get(m.group(1)) if m else None
        base = getattr(layer, "base_layer", layer)
        weight = getattr(base, "weight", None)
        if weight is None:
            raise ValueError(f"{flag} {file}: {key} names no layer of this base UNet: a LoRA for another model")
        out_dim, in_dim = weight.shape[0], weight.shape[1]
        fits = shape[1] == in_dim if m.group(2) == "lora_A" else shape[0] == out_dim
        if not fits:
            raise ValueError(f"{flag} {file}: {key} has shape {shape}, which does not fit this base's layer of shape "
                             f"{tuple(weight.shape)}: a LoRA trained on another base geometry")


def apply(unet, loras, text_encoder=None, flag="--lora"):
    """Load each (path, scale) of `loras` into `unet` as adapter lora_<i>, and the text-encoder weights a file may
    hold into `text_encoder`, then activate them all with their scales: the steps of mindone's load_lora_weights and
    set_adapters, which would read each file again after check_fits. Without `text_encoder`, a file with text-encoder
    weights is refused. Returns the adapter names."""
    from mindone.diffusers import StableDiffusionPipeline
    from mindone.diffusers.loaders.lora_base import set_adapters_for_text_encoder

    names, text_names = [], []
    for i, (path, _) in enumerate(loras):
        file = weight_file(path, flag)
        state, alphas, meta = read_lora(file, unet, flag)
        check_fits(unet, state, file, flag)
        name = f"lora_{i}"
        text = any(k.startswith("text_encoder.") for k in state)
        if text and text_encoder is None:
            raise ValueError(f"{flag} {file}: it holds text-encoder LoRA weights, which only t2i-infer applies; "
                             "pass a UNet-only LoRA")
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, adapter_name=name, metadata=meta)
        if text:
            StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder, adapter_name=name,
                                                                metadata=meta)
            text_names.append(name)
        names.append(name)
    scales = {name: scale for name, (_, scale) in zip(names, loras)}
    if names:
        unet.set_adapters(names, [scales[n] for n in names])
    if text_names:
        set_adapters_for_text_encoder(text_names, text_encoder, [scales[n] for n in text_names])
    return names


def describe(lora_config) -> dict:
    """What the model cards say about an adapter: rank, alpha, dropout and the kinds of layer it wraps (each target's
    own name, with its index for a list entry such as to_out.0, whether the config names layers so or by path)."""
    def kind(target):
        parts = target.split(".")
        return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]

    return {"rank": lora_config.r, "alpha": lora_config.lora_alpha,
            "target_modules": sorted({kind(t) for t in lora_config.target_modules}),
            "dropout": lora_config.lora_dropout}
