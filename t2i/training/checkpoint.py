"""Full-state checkpoints (UNet or LoRA adapter, optimizer, loss scaler, EMA, trainer position) and exact resume from
them. A LoRA run's checkpoint holds the adapter (diffusers' pytorch_lora_weights.safetensors, so t2i-infer --lora and
diffusers load it too), not the frozen base.

A checkpoint is written into a temporary folder and renamed into place, so a kill at any moment leaves either the
complete checkpoint or none; older ones are pruned only after the new one is complete.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from t2i.core.atomic import atomic_dir, atomic_write_json
from t2i.interop import tensorfile

# Changing any of these makes the saved position or state meaningless for the new run.
RESUME_KEYS = ("latent_store", "seed", "train_batch_size", "gradient_accumulation_steps", "prediction_type",
               "mixed_precision", "num_validation_samples", "lora_rank", "lora_alpha", "lora_target_modules")


@dataclass
class TrainState:
    """What a checkpoint saves and a resume restores: the weights being trained and everything that updates them."""

    unet: object  # mindone UNet2DConditionModel (with LoRA adapters when lora_config is set)
    optimizer: object  # t2i.training.optim.build_adamw
    train_step: object  # t2i.training.step.build_train_step: its loss scaler is saved
    ema: object | None  # t2i.training.step.build_ema when --use_ema
    param_names: list  # structural names of the trainable parameters, in optimizer order
    lora_config: object | None = None  # mindone.peft LoraConfig of the adapter being trained (--lora_rank)
    skipped_steps: int = 0  # optimizer steps skipped for an fp16 overflow

    @property
    def loss_scaler(self):
        return self.train_step.grad_scaler.loss_scaler


def _params_of(obj):
    """name -> Parameter of a Cell, or of a plain object holding Parameters (mindspore.amp's loss scalers)."""
    import mindspore as ms

    if isinstance(obj, ms.nn.Cell):
        return dict(obj.parameters_and_names())
    return {name: v for name, v in vars(obj).items() if isinstance(v, ms.Parameter)}


def _state_of(obj, skip=()):
    """name -> Parameter of `obj`, leaving out the Parameter objects in `skip` (e.g. the UNet's, saved apart)."""
    skip_ids = {id(p) for p in skip}
    return {name: p for name, p in _params_of(obj).items() if id(p) not in skip_ids}


def _optimizer_state(state: TrainState):
    """The optimizer's own state: moments, step counters. The lr list is rebuilt from the config (so a resume may
    extend --max_train_steps) and the weights are saved apart."""
    return _state_of(state.optimizer, skip=list(state.unet.get_parameters())
                     + list(state.optimizer.learning_rate.get_parameters()))


def _ema_state(state: TrainState):
    return dict(zip(state.param_names, state.ema.shadow_params))


def list_checkpoints(output_dir):
    """Complete checkpoints under output_dir as (step, path), oldest first; the step is read from its state file."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        info = path / "trainer_state.json"
        if path.is_dir() and info.is_file():
            found.append((json.loads(info.read_text())["step"], path))
    return sorted(found)


def resolve_resume(resume_from_checkpoint, output_dir):
    """The checkpoint folder --resume_from_checkpoint names ('latest': the newest under output_dir), or None."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            print(f"resume: no checkpoint in {output_dir}; starting a new run")
            return None
        return found[-1][1]
    path = Path(resume_from_checkpoint)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(
            f"--resume_from_checkpoint: {path} is not a t2i checkpoint (no trainer_state.json); "
            "pass a checkpoint-N folder or 'latest'"
        )
    return path


def _same_setting(key, saved, current) -> bool:
    if key == "latent_store" and saved is not None:  # ./latents.zarr and /abs/latents.zarr are the same store
        return Path(saved).resolve() == Path(current).resolve()
    return saved == current


def check_resume(path, config: dict):
    """Refuse a resume whose settings (RESUME_KEYS of the config dict) differ from the checkpoint's: run before any
    model loads, so a mismatch fails in seconds."""
    saved = json.loads((Path(path) / "config.json").read_text())
    changed = [k for k in RESUME_KEYS if not _same_setting(k, saved.get(k), config.get(k))]
    if changed:
        detail = ", ".join(f"--{k} {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise ValueError(f"--resume_from_checkpoint {path}: cannot resume with changed {detail}")


def save_checkpoint(state: TrainState, folder, step: int, progress: dict, config: dict):
    """Write checkpoint `folder` (atomically): the UNet or adapter, optimizer, loss scaler and EMA state, the
    position (`progress`, beside step and skipped_steps) and the run's config dict."""
    from t2i.interop import lora

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        if state.lora_config is not None:
            lora.save_adapter(state.unet, state.lora_config, tmp)
        else:
            state.unet.save_pretrained(str(tmp / "unet"))
        tensorfile.save(_optimizer_state(state), tmp / "optimizer.safetensors")
        tensorfile.save(_state_of(state.loss_scaler), tmp / "loss_scaler.safetensors")
        if state.ema is not None:
            tensorfile.save(_ema_state(state), tmp / "ema.safetensors")
            ema = {k: v for k, v in state.ema.state_dict().items() if k != "shadow_params"}
            atomic_write_json(tmp / "ema_state.json", ema)
        atomic_write_json(tmp / "trainer_state.json", {"step": step, **progress,
                                                        "skipped_steps": state.skipped_steps})
        atomic_write_json(tmp / "config.json", config)
    return folder


def prune_checkpoints(output_dir, keep: int):
    """Delete all but the newest `keep` complete checkpoints; called only after a new one is complete, so a crash
    while saving leaves every older one intact."""
    for _, old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)


def load_checkpoint(state: TrainState, path) -> int:
    """Restore `state` from checkpoint `path` (check_resume has passed); returns the step to continue from."""
    from safetensors.numpy import load_file

    from t2i.interop import lora

    path = Path(path)
    where = f"--resume_from_checkpoint {path}"
    if state.lora_config is not None:
        lora.set_adapter_state(state.unet, load_file(str(path / lora.WEIGHT_NAME)), path)
    else:
        tensorfile.load_into(dict(state.unet.parameters_and_names()),
                             path / "unet" / "diffusion_pytorch_model.safetensors", where)
    tensorfile.load_into(_optimizer_state(state), path / "optimizer.safetensors", where)
    tensorfile.load_into(_state_of(state.loss_scaler), path / "loss_scaler.safetensors", where)
    if state.ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise ValueError(f"--use_ema: checkpoint {path} was saved without EMA weights")
        tensorfile.load_into(_ema_state(state), path / "ema.safetensors", where)
        state.ema.load_state_dict(json.loads((path / "ema_state.json").read_text()))
    info = json.loads((path / "trainer_state.json").read_text())
    state.skipped_steps = info["skipped_steps"]
    return info["step"]
