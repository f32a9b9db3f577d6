"""Loading the pipeline's components from a local diffusers folder, and fingerprinting what the store depends on.

Every loader goes through mindone's `from_pretrained` and then refuses a model with any weight left at its random
initial value, which mindone only warns about. Folders published for PyTorch load as they are: PyTorch parameter
names, .safetensors or .bin weights (read here without torch), fp16 variants, shards, and a CLIP text encoder saved by
transformers >= 5.6, which dropped the `text_model.` prefix from the saved names.
"""

import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

import mindspore as ms
import numpy as np

DTYPES = {"no": ms.float32, "fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}
# The store's latents and text states are functions of these components only (those the folder has: SDXL's second
# text encoder and tokenizer); the UNet is what gets trained.
FINGERPRINT_COMPONENTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
# (safetensors name, torch.save name) of each component's weights, as diffusers and transformers write them.
WEIGHT_NAMES = {
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
    "text_encoder_2": ("model.safetensors", "pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "safety_checker": ("model.safetensors", "pytorch_model.bin"),
}
CLIP_PREFIX = "text_model."
# The names mindone gives PyTorch's Embedding, LayerNorm/GroupNorm and BatchNorm parameters (undone by pytorch_names).
MINDSPORE_NAMES = (".embedding_table", ".gamma", ".beta", ".moving_mean", ".moving_variance")
# The safetensors formats PyTorch transformers loads; it refuses the others, mindone's "np" included.
TRANSFORMERS_FORMATS = (None, "pt", "mlx")


def check_model_dir(path, flag="--pretrained_model_name_or_path") -> Path:
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ValueError(
            f"{flag}: {path} is not a diffusers pipeline folder (no model_index.json); pass a local folder such as "
            "one written by `save_pretrained` or `t2i-tiny-model`, or a Hub model id"
        )
    return path


def pipeline_components(model_dir) -> list:
    """The component folders model_dir's model_index.json names ([null, null] entries name none)."""
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    return [name for name, entry in index.items()
            if not name.startswith("_") and isinstance(entry, list) and any(entry)]


def family(model_dir) -> str:
    """"sdxl" for a StableDiffusionXLPipeline folder (two text encoders, pooled text and size conditioning), "sd"
    for the SD 1.x/2.x family."""
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    return "sdxl" if str(index.get("_class_name", "")).startswith("StableDiffusionXL") else "sd"


def present(model_dir, components) -> list:
    """`components` without SDXL's second text encoder and tokenizer when the folder's index names neither (SD)."""
    named = set(pipeline_components(model_dir))
    return [c for c in components if not (c.endswith("_2") and c not in named)]


def force_zeros_for_empty_prompt(model_dir) -> bool:
    """SDXL's rule for the empty prompt (model_index.json, default true): the unconditional text states and pooled
    embedding are zeros rather than the encoding of ""."""
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    return bool(index.get("force_zeros_for_empty_prompt", True))


def fingerprint(model_dir, components=FINGERPRINT_COMPONENTS) -> str:
    """sha256 over the names and bytes of every file in the given component folders (configs, weights, vocab) that
    the folder has (`present`): an SD folder's is that of its three."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for component in present(model_dir, components):
        folder = model_dir / component
        if not folder.is_dir():
            raise ValueError(f"{model_dir}: missing component folder {component}/")
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(model_dir)).encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# torch.save archives without torch


_TORCH_STORAGES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def _rebuild_tensor(storage, offset, size, stride, *_):
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * storage.itemsize for s in stride)
    )
    # A copy: the storage buffer is read-only and may be shared by several tensors.
    return np.array(view)


class _TorchUnpickler(pickle.Unpickler):
    """Only what a saved state dict holds: an OrderedDict of tensors. Anything else is refused, never executed."""

    def find_class(self, module, name):
        import ml_dtypes

        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *_: data
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name == "BFloat16Storage":
            return np.dtype(ml_dtypes.bfloat16)
        if module == "torch" and name in _TORCH_STORAGES:
            return np.dtype(_TORCH_STORAGES[name])
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file")


def read_torch_bin(path) -> dict:
    """The tensors of a `torch.save` zip archive (the .bin weights on the Hub) as NumPy arrays."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a torch.save zip archive (legacy or damaged .bin); convert it to .safetensors")
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: not a torch.save archive (no single data.pkl inside)")
        root = pickles[0][: -len("data.pkl")]
        storages = {}

        def storage(pid):
            _, dtype, key, _, _ = pid
            if key not in storages:
                storages[key] = np.frombuffer(zf.read(f"{root}data/{key}"), dtype=dtype)
            return storages[key]

        unpickler = _TorchUnpickler(io.BytesIO(zf.read(pickles[0])))
        unpickler.persistent_load = storage
        try:
            state = unpickler.load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: {e}; only plain state dicts are read, convert it to .safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ValueError(f"{path}: holds no state dict of tensors")
    return dict(state)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def weight_files(folder, component, variant=None, listing=None) -> list:
    """The component's weight file(s), preferring .safetensors, following a shard index when there is one.

    `listing` names the folder's files when the weights are not on disk yet (a Hub repo's, before the download); the
    shard index, if chosen, must be."""
    from mindone.diffusers.utils import _add_variant

    folder = Path(folder)
    listed = None if listing is None else set(listing)
    present = (lambda path: path.is_file()) if listed is None else (lambda path: path.name in listed)
    looked = []
    for name in WEIGHT_NAMES[component]:
        single = folder / _add_variant(name, variant)
        index = folder / _add_variant(f"{name}.index.json", variant)
        looked += [single.name, index.name]
        if present(single):
            return [single]
        if present(index):
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            absent = [s for s in shards if not present(folder / s)]
            if absent:
                raise ValueError(f"{index}: shard {absent[0]} is missing; download the complete folder")
            return [folder / s for s in shards]
    fix = f"drop --variant {variant} or fetch those files" if variant else "fetch the weights (e.g. `git lfs pull`)"
    raise ValueError(f"{folder}: no {component} weights ({', '.join(looked)} not found); {fix}")


def _safetensors_keys(files):
    from safetensors import safe_open

    keys = []
    for f in files:
        with safe_open(str(f), framework="np") as fh:
            keys += list(fh.keys())
    return keys


def _flat_clip(component, keys) -> bool:
    return component.startswith("text_encoder") and not any(k.startswith(CLIP_PREFIX) for k in keys)


@contextlib.contextmanager
def _staged(folder, component, files):
    """A temporary one-file safetensors copy of the component, under the names mindone's loader recognises."""
    from mindone.safetensors.mindspore import load_file, save_file

    tensors = {}
    for f in files:
        if f.suffix == ".bin":
            tensors.update({k: ms.Tensor(v) for k, v in read_torch_bin(f).items()})
        else:
            tensors.update(load_file(str(f)))
    if _flat_clip(component, tensors):
        tensors = {CLIP_PREFIX + k: v for k, v in tensors.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f"t2i-{component}-"))
    try:
        shutil.copy(folder / "config.json", tmp / "config.json")
        save_file(tensors, str(tmp / WEIGHT_NAMES[component][0]), metadata={"format": "pt"})
        del tensors  # mindone reads the file again: do not hold two copies of the weights meanwhile
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_component(from_pretrained, model_dir, component, revision, variant, **kwargs):
    from safetensors import SafetensorError

    folder = Path(model_dir) / component
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json; {Path(model_dir)} is not a complete diffusers pipeline folder")
    files = weight_files(folder, component, variant)
    try:
        if files[0].suffix == ".safetensors" and not _flat_clip(component, _safetensors_keys(files)):
            model, info = from_pretrained(
                str(model_dir), subfolder=component, revision=revision, variant=variant, output_loading_info=True,
                **kwargs,
            )
        else:
            with _staged(folder, component, files) as tmp:
                model, info = from_pretrained(str(tmp), output_loading_info=True, **kwargs)
    except (RuntimeError, OSError, SafetensorError) as e:
        # Shape mismatches and damaged files surface as multi-line framework errors; keep the telling line.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "shape" in line), lines[0])
        raise ValueError(
            f"{folder}: cannot load the {component} weights ({reason}); do config.json and the weights match?"
        ) from None
    _require_every_weight(model, info, folder, component, files)
    return model


def _require_every_weight(model, info, folder, component, files):
    """mindone leaves a weight the checkpoint lacks at its random initial value with only a warning: refuse instead."""
    if not info["missing_keys"]:
        return
    names = pytorch_names(model)
    absent = sorted(names.get(k, k) for k in info["missing_keys"])
    shown = ", ".join(absent[:6]) + (f" and {len(absent) - 6} more" if len(absent) > 6 else "")
    raise ValueError(
        f"{folder}: {len(absent)} of {len(names)} {component} weights are not in {', '.join(f.name for f in files)} "
        f"and would be left randomly initialised ({shown}); use a complete Stable Diffusion folder in diffusers layout"
    )


def load_vae(model_dir, revision=None, variant=None, dtype=ms.float32):
    from mindone.diffusers import AutoencoderKL

    return _load_component(AutoencoderKL.from_pretrained, model_dir, "vae", revision, variant, mindspore_dtype=dtype)


def load_text_encoder(model_dir, revision=None, variant=None, dtype=ms.float32, component="text_encoder"):
    """(tokenizer, text encoder) of `component`: text_encoder (CLIPTextModel), or SDXL's text_encoder_2 with
    tokenizer_2 (CLIPTextModelWithProjection: also the pooled projection)."""
    from mindone.transformers import CLIPTextModel, CLIPTextModelWithProjection
    from transformers import CLIPTokenizer

    second = component == "text_encoder_2"
    tokenizer = CLIPTokenizer.from_pretrained(str(model_dir), subfolder="tokenizer_2" if second else "tokenizer",
                                              revision=revision)
    model_cls = CLIPTextModelWithProjection if second else CLIPTextModel
    encoder = _load_component(model_cls.from_pretrained, model_dir, component, revision, variant, dtype=dtype)
    encoder.set_train(False)
    return tokenizer, encoder


@dataclasses.dataclass
class TextEncoders:
    """A pipeline's tokenizers and text encoders as the UNet sees their output: SD 1.x/2.x's one encoder's last
    hidden state; SDXL's two encoders' penultimate hidden states side by side plus the second's pooled projection."""

    tokenizers: list
    encoders: list

    @classmethod
    def load(cls, model_dir, revision=None, variant=None, dtype=ms.float32) -> "TextEncoders":
        names = ("text_encoder", "text_encoder_2") if family(model_dir) == "sdxl" else ("text_encoder",)
        pairs = [load_text_encoder(model_dir, revision, variant, dtype, name) for name in names]
        return cls([tok for tok, _ in pairs], [enc for _, enc in pairs])

    @property
    def sdxl(self) -> bool:
        return len(self.encoders) == 2

    @property
    def width(self) -> int:
        """The text states' width: the UNet's cross_attention_dim."""
        return sum(enc.config.hidden_size for enc in self.encoders)

    @property
    def length(self) -> int:
        return self.tokenizers[0].model_max_length

    @property
    def pooled_dim(self) -> int | None:
        return self.encoders[1].config.projection_dim if self.sdxl else None

    def encode(self, captions) -> tuple:
        """(text states (n, L, D) float32, pooled (n, P) float32 or None) of the captions, as the pipelines encode
        prompts: padded to the tokenizers' max length, SDXL's states from the penultimate layers (its pipeline's
        default clip_skip)."""
        if not self.sdxl:
            return encode_text(self.tokenizers[0], self.encoders[0], captions).float().asnumpy(), None
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            out = encoder(ms.Tensor(_token_ids(tokenizer, captions), ms.int32), output_hidden_states=True)
            states.append(out[-1][-2].float().asnumpy())
            if out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = out[0].float().asnumpy()
        return np.concatenate(states, axis=-1), pooled


def load_unet(model_dir, revision=None, variant=None, dtype=ms.float32):
    from mindone.diffusers import UNet2DConditionModel

    return _load_component(
        UNet2DConditionModel.from_pretrained, model_dir, "unet", revision, variant, mindspore_dtype=dtype
    )


def load_safety_checker(model_dir, revision=None, variant=None, dtype=ms.float32):
    from mindone.diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    return _load_component(
        StableDiffusionSafetyChecker.from_pretrained, model_dir, "safety_checker", revision, variant, dtype=dtype
    )


def _token_ids(tokenizer, captions) -> np.ndarray:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="np").input_ids


def encode_text(tokenizer, text_encoder, captions):
    """CLIP last hidden state for each caption, padded to the tokenizer's max length as the seed script does."""
    return text_encoder(ms.Tensor(_token_ids(tokenizer, captions), ms.int32))[0]


@contextlib.contextmanager
def compiled(unet):
    """Within the block, `unet(sample, timestep, encoder_hidden_states, return_dict=False)` -- the call
    StableDiffusionPipeline makes for SD 1.x/2.x, and train's validation -- runs as one ms.jit graph per input shape
    instead of ~400 PyNative ops (tiny UNet forward, batch 2, 16x16 latents on the 2-core CPU: ~76 -> ~19 ms, after
    ~7 s of compiling). Other calls keep the PyNative path. The graph stays on the UNet for the next block and reads
    the current weights, so a later block (next validation, EMA weights swapped in) does not compile again."""
    original = type(unet).construct.__get__(unet)
    graph = unet.__dict__.get("_t2i_graph")
    if graph is None:

        @ms.jit
        def graph(sample, timestep, encoder_hidden_states):
            return original(sample, timestep, encoder_hidden_states, return_dict=False)

        unet.__dict__["_t2i_graph"] = graph

    def construct(sample, timestep, encoder_hidden_states=None, timestep_cond=None, cross_attention_kwargs=None,
                  added_cond_kwargs=None, return_dict=True, **rest):
        if (rest or return_dict or encoder_hidden_states is None or timestep_cond is not None
                or cross_attention_kwargs or added_cond_kwargs):
            return original(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                            cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs,
                            return_dict=return_dict, **rest)
        # A Python number would be baked into the graph as a constant: one compile per timestep.
        return graph(sample, ms.Tensor(timestep) if not isinstance(timestep, ms.Tensor) else timestep,
                     encoder_hidden_states)

    unet.__dict__["construct"] = construct
    try:
        yield unet
    finally:
        del unet.__dict__["construct"]


# ---------------------------------------------------------------------------------------------------------------------
# Writing for PyTorch


def pytorch_names(model) -> dict:
    """MindSpore parameter name -> PyTorch state-dict name, by inverting mindone's own PyTorch-to-MindSpore renaming.

    mindone names Embedding tables `embedding_table` and LayerNorm/GroupNorm affines `gamma`/`beta` where PyTorch has
    `weight`/`bias`; everything else keeps its name. (Conv1d weights would also need a reshape; SD has none.)
    """
    from mindone.diffusers import ModelMixin

    if isinstance(model, ModelMixin):
        from mindone.diffusers.models.modeling_utils import _get_pt2ms_mappings
    else:
        from mindone.transformers.modeling_utils import _get_pt2ms_mappings
    renamed = {ms_name: pt_name for pt_name, (ms_name, _) in _get_pt2ms_mappings(model).items() if ms_name}
    return {name: renamed.get(name, name) for name, _ in model.parameters_and_names()}


def pytorch_state_dict(model) -> dict:
    names = pytorch_names(model)
    return {names[name]: param.asnumpy() for name, param in model.parameters_and_names()}


def save_pytorch_weights(model, path, dtype=None):
    """The model's weights as one safetensors file under PyTorch names and format, cast to `dtype` if given."""
    from t2i.interop import tensorfile

    tensorfile.save(pytorch_state_dict(model), path, metadata={"format": "pt"}, dtype=dtype)


def save_pretrained_pytorch(model, folder):
    """`save_pretrained`, with the weights rewritten under PyTorch names and format so PyTorch libraries load them."""
    from mindone.diffusers import ModelMixin

    model.save_pretrained(str(folder))
    name = WEIGHT_NAMES["unet" if isinstance(model, ModelMixin) else "text_encoder"][0]
    save_pytorch_weights(model, Path(folder) / name)


def loads_in_pytorch(folder, component, variant=None) -> bool:
    """Whether PyTorch diffusers/transformers load the component's weights as they are: not under mindone's names or
    transformers 5.6's flat CLIP names and, for a transformers model, in a safetensors format it accepts."""
    from safetensors import safe_open

    files = weight_files(folder, component, variant)
    if files[0].suffix != ".safetensors":
        return True  # torch.save archives are written by PyTorch
    keys, formats = [], set()
    for f in files:
        with safe_open(str(f), framework="np") as fh:
            keys += list(fh.keys())
            formats.add((fh.metadata() or {}).get("format"))
    transformers_model = WEIGHT_NAMES[component][0] == "model.safetensors"
    return (not _flat_clip(component, keys) and not any(k.endswith(MINDSPORE_NAMES) for k in keys)
            and (not transformers_model or formats <= set(TRANSFORMERS_FORMATS)))


def stored_dtype(files):
    """The one dtype the safetensors weight files hold, as NumPy's; None when they mix several."""
    import ml_dtypes
    from safetensors import safe_open

    dtypes = set()
    for f in files:
        with safe_open(str(f), framework="np") as fh:
            dtypes |= {fh.get_slice(k).get_dtype() for k in fh.keys()}
    numpy_dtypes = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
    return numpy_dtypes.get(dtypes.pop()) if len(dtypes) == 1 else None


# ---------------------------------------------------------------------------------------------------------------------
# Attention


def enable_memory_efficient_attention(unet, device_target) -> str:
    """The --enable_xformers_memory_efficient_attention counterpart: MindSpore's fused flash attention, Ascend only."""
    if str(device_target).lower() != "ascend":
        return (
            f"--enable_xformers_memory_efficient_attention: not available on {device_target} (MindSpore's flash "
            "attention, FlashAttentionScore, runs only on Ascend); using standard attention"
        )
    unet.enable_xformers_memory_efficient_attention()
    return "--enable_xformers_memory_efficient_attention: using MindSpore FlashAttentionScore in the UNet"


# ---------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing


def enable_gradient_checkpointing(unet):
    """--gradient_checkpointing as diffusers does it: every ResNet and transformer layer of the down, mid and up blocks
    keeps only its inputs for the backward pass, which reruns the layer's forward for its activations. Same loss and
    gradients (PyNative fp16: within fp16 rounding) for one more forward per step, compiled and in PyNative. Peak RSS
    of one forward+backward, tiny UNet, batch 2, 64x64 latents, CPU: PyNative 7.3 -> 5.1 GB; compiled 7.0 -> 8.2 GB
    (the graph does recompute, but MindSpore's CPU backend gains no memory from it)."""
    from t2i.core import compat

    if compat.mindone_gradient_checkpointing():
        unet.enable_gradient_checkpointing()  # what mindone's train_text_to_image.py calls
        return
    # mindone 0.5.0's unet.enable_gradient_checkpointing() calls Cell.recompute_, which no MindSpore in t2i's range has
    # (2.7.1 and 2.10.0 checked): t2i marks the layers itself.
    for _, block in unet.cells_and_names():
        if hasattr(block, "gradient_checkpointing"):  # diffusers' mark of a block that checkpoints its layers
            for layer in (*block.resnets, *getattr(block, "attentions", ())):
                # The default, reentrant recompute: use_reentrant=False (with early_stop) leaves PyNative's mixed
                # precision at fp16 after the backward pass, and the fp16 loss scale 65536 then overflows to inf.
                layer.recompute()
            block.gradient_checkpointing = True  # what mindone's unet.is_gradient_checkpointing reports
