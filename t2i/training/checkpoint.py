"""Full-state checkpoints (UNet or LoRA adapter, optimizer, loss scaler, EMA, trainer position) and exact resume from
them. A LoRA run's checkpoint holds the adapter (diffusers' pytorch_lora_weights.safetensors, so t2i-infer --lora and
diffusers load it too), not the frozen base.

A checkpoint is written into a temporary folder and renamed into place, so a kill at any moment leaves either the
complete checkpoint or none; older ones are pruned only after the new one is complete.
"""

import json
import shutil
from pathlib import Path

from t2i.core.atomic import atomic_dir, atomic_write_json
from t2i.interop import tensorfile

# Changing any of these makes the saved position or state meaningless for the new run.
RESUME_KEYS = ("latent_store", "seed", "train_batch_size", "gradient_accumulation_steps", "prediction_type",
               "mixed_precision", "num_validation_samples", "lora_rank", "lora_alpha", "lora_target_modules")


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


def _optimizer_state(tr):
    """The optimizer's own state: moments, step counters. The lr list is rebuilt from the config (so a resume may
    extend --max_train_steps) and the weights are saved apart."""
    return _state_of(tr.optimizer, skip=list(tr.unet.get_parameters()) + list(tr.optimizer.learning_rate.get_parameters()))


def _ema_state(tr):
    return dict(zip(tr.param_names, tr.ema.shadow_params))


def list_checkpoints(output_dir):
    """Complete checkpoints under output_dir as (step, path), oldest first; the step is read from its state file."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        state = path / "trainer_state.json"
        if path.is_dir() and state.is_file():
            found.append((json.loads(state.read_text())["step"], path))
    return sorted(found)


def resolve_resume(config):
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        found = list_checkpoints(config.output_dir)
        if not found:
            print(f"resume: no checkpoint in {config.output_dir}; starting a new run")
            return None
        return found[-1][1]
    path = Path(config.resume_from_checkpoint)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(
            f"--resume_from_checkpoint: {path} is not a t2i checkpoint (no trainer_state.json); "
            "pass a checkpoint-N folder or 'latest'"
        )
    return path


def save_checkpoint(tr, step):
    from t2i.interop import lora

    cfg = tr.config
    final = Path(cfg.output_dir) / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        if tr.lora_config is not None:
            lora.save_adapter(tr.unet, tr.lora_config, tmp)
        else:
            tr.unet.save_pretrained(str(tmp / "unet"))
        tensorfile.save(_optimizer_state(tr), tmp / "optimizer.safetensors")
        tensorfile.save(_state_of(tr.train_step.grad_scaler.loss_scaler), tmp / "loss_scaler.safetensors")
        if tr.ema is not None:
            tensorfile.save(_ema_state(tr), tmp / "ema.safetensors")
            state = {k: v for k, v in tr.ema.state_dict().items() if k != "shadow_params"}
            atomic_write_json(tmp / "ema_state.json", state)
        epoch, position = divmod(step, tr.batches.steps_per_epoch)
        atomic_write_json(tmp / "trainer_state.json", {
            "step": step, "epoch": epoch, "position_in_epoch": position,
            "samples_seen": step * tr.global_batch, "skipped_steps": tr.skipped_steps,
            "rng": {"numpy": f"default_rng([seed={cfg.seed}, step]) per optimizer step; next step {step}",
                    "mindspore_seed": cfg.seed},
        })
        atomic_write_json(tmp / "config.json", cfg.public_dict())
    if cfg.checkpoints_total_limit is not None:
        # Prune only now that the new checkpoint is complete: a crash above leaves every older one intact.
        for _, old in list_checkpoints(cfg.output_dir)[: -cfg.checkpoints_total_limit]:
            shutil.rmtree(old)
    return final


def _same_setting(key, saved, current) -> bool:
    if key == "latent_store" and saved is not None:  # ./latents.zarr and /abs/latents.zarr are the same store
        return Path(saved).resolve() == Path(current).resolve()
    return saved == current


def load_checkpoint(tr, path):
    from safetensors.numpy import load_file

    from t2i.interop import lora

    cfg = tr.config
    where = f"--resume_from_checkpoint {path}"
    saved = json.loads((path / "config.json").read_text())
    changed = [k for k in RESUME_KEYS if not _same_setting(k, saved.get(k), getattr(cfg, k))]
    if changed:
        detail = ", ".join(f"--{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ValueError(f"{where}: cannot resume with changed {detail}")
    if tr.lora_config is not None:
        lora.set_adapter_state(tr.unet, load_file(str(path / lora.WEIGHT_NAME)), path)
    else:
        tensorfile.load_into(dict(tr.unet.parameters_and_names()), path / "unet" / "diffusion_pytorch_model.safetensors",
                             where)
    tensorfile.load_into(_optimizer_state(tr), path / "optimizer.safetensors", where)
    tensorfile.load_into(_state_of(tr.train_step.grad_scaler.loss_scaler), path / "loss_scaler.safetensors", where)
    if tr.ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise ValueError(f"--use_ema: checkpoint {path} was saved without EMA weights")
        tensorfile.load_into(_ema_state(tr), path / "ema.safetensors", where)
        state = json.loads((path / "ema_state.json").read_text())
        tr.ema.load_state_dict(state)
    state = json.loads((path / "trainer_state.json").read_text())
    tr.skipped_steps = state["skipped_steps"]
    return state["step"]
