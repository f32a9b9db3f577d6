"""Stage 2: train only the UNet on the cached latents of a t2i store.

Shape (litgpt): `run(config)` -> `setup` (device, store, models, optimizer, resume) -> `fit` (one flat loop).
Every random draw of optimizer step s comes from np.random.default_rng([seed, s]) and covers the whole global batch,
so a resumed run, a run with more accumulation steps or more workers sees exactly the same samples and noise.
"""

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import time
import types
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from t2i import losses
from t2i.hub import push_to_hub
from t2i.io import atomic_dir, atomic_write_json, cli_errors, device_option
from t2i.modelcard import write_model_card

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
PIPELINE_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")
RESUME_KEYS = ("latent_store", "seed", "train_batch_size", "gradient_accumulation_steps", "prediction_type",
               "mixed_precision", "num_validation_samples")


@dataclass(frozen=True)
class TrainConfig:
    pretrained_model_name_or_path: str
    latent_store: str
    output_dir: str = "sd-model-finetuned"
    seed: int = 0
    train_batch_size: int = 16
    num_train_epochs: int = 100
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None
    prediction_type: str | None = None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    mixed_precision: str = "no"
    use_ema: bool = False
    ema_decay: float = 0.9999
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_prompts: tuple = ()
    validation_steps: int | None = None
    validation_inference_steps: int = 20
    num_validation_samples: int = 4
    logging_dir: str = "logs"
    report_to: str = "tensorboard"
    distributed: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    jit: bool = True
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None
    device_target: str | None = None

    def __post_init__(self):
        positive = ("train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "checkpointing_steps",
                    "validation_inference_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_train_steps", "validation_steps", "checkpoints_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"--lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise ValueError(f"--prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.report_to not in ("tensorboard", "none"):
            raise ValueError(f"--report_to must be tensorboard or none, got {self.report_to!r}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"--snr_gamma must be positive, got {self.snr_gamma}")
        if self.learning_rate <= 0 or self.max_grad_norm <= 0:
            raise ValueError("--learning_rate and --max_grad_norm must be positive")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/sd-naruto-model)")
        if self.num_validation_samples < 0 or self.lr_warmup_steps < 0:
            raise ValueError("--num_validation_samples and --lr_warmup_steps must be >= 0")

    def public_dict(self) -> dict:
        """The config as printed and saved (config.json, checkpoints, model card): the Hub token never leaves."""
        d = dataclasses.asdict(self)
        if d["hub_token"]:
            d["hub_token"] = "***"
        return d

    @property
    def log_dir(self) -> Path:
        return Path(self.output_dir) / self.logging_dir


# ---------------------------------------------------------------------------------------------------------------------
# Sample order


def split_holdout(slots, n, seed):
    """(train slots, held-out validation slots): a seeded choice of n slots is kept out of training."""
    if n == 0:
        return slots, slots[:0]
    chosen = np.random.default_rng([seed, 7]).permutation(len(slots))[:n]
    mask = np.zeros(len(slots), bool)
    mask[chosen] = True
    return slots[~mask], np.sort(slots[mask])


def epoch_order(slots, chunk_rows, seed, epoch):
    """A shuffle that reads few chunks per batch: chunks in random order, samples shuffled within runs of 4 chunks."""
    rng = np.random.default_rng([seed, epoch])
    chunk_of = slots // chunk_rows
    chunk_ids = rng.permutation(np.unique(chunk_of))
    by_chunk = [slots[chunk_of == c] for c in chunk_ids]
    order = []
    for i in range(0, len(by_chunk), 4):
        window = np.concatenate(by_chunk[i : i + 4])
        order.append(window[rng.permutation(len(window))])
    return np.concatenate(order) if order else slots[:0]


# ---------------------------------------------------------------------------------------------------------------------
# One optimizer step's inputs, on the host


def draw(rng, n, latent_shape, config, num_train_timesteps):
    """Every random number one optimizer step needs, for all n samples of the global batch, in a fixed order.

    Drawn for the whole global batch and then sliced per worker and micro-batch, so that the run does not depend
    on how the batch is split.
    """
    shape = (n,) + tuple(latent_shape)
    d = {
        "view": rng.integers(0, 2, n),
        "caption": rng.random(n),
        "eps": rng.standard_normal(shape, dtype=np.float32),
        "noise": rng.standard_normal(shape, dtype=np.float32),
        "timesteps": rng.integers(0, num_train_timesteps, n),
    }
    if config.noise_offset:
        d["offset"] = rng.standard_normal(shape[:2], dtype=np.float32)
    if config.input_perturbation:
        d["perturbation"] = rng.standard_normal(shape, dtype=np.float32)
    return d


def make_batch(store_arrays, draws, scaling_factor, alphas_cumprod, config, prediction_type):
    """Turn stored moments + text states into UNet inputs, target and per-sample loss weights (all NumPy)."""
    moments, text, counts = store_arrays
    n = len(moments)
    view = draws["view"] if moments.shape[1] == 2 else np.zeros(n, np.int64)
    caption = np.floor(draws["caption"] * counts).astype(np.int64)
    x0 = losses.sample_latents(moments[np.arange(n), view], draws["eps"], scaling_factor)
    noise = draws["noise"]
    if config.noise_offset:
        noise = losses.offset_noise(noise, draws["offset"], config.noise_offset)
    timesteps = draws["timesteps"]
    noised = noise + config.input_perturbation * draws["perturbation"] if config.input_perturbation else noise
    noisy = losses.add_noise(x0, noised, timesteps, alphas_cumprod).astype(np.float32)
    tgt = losses.target(x0, noise, timesteps, alphas_cumprod, prediction_type).astype(np.float32)
    if config.snr_gamma is None:
        weights = np.ones(n, np.float32)
    else:
        snr = losses.snr(timesteps, alphas_cumprod)
        weights = losses.min_snr_weights(snr, config.snr_gamma, prediction_type).astype(np.float32)
    states = text[np.arange(n), caption].astype(np.float32)
    return noisy, timesteps.astype(np.int32), states, tgt, weights


def rank_indices(rank, world, batch, accumulation):
    """Positions in the global batch that this worker trains on, micro-batch by micro-batch.

    The global batch is `accumulation` micro-batches of world x batch samples, each split by rank, so that one worker
    with batch 2b sees, in every micro-batch, exactly the samples two workers with batch b see together.
    """
    return np.concatenate([m * world * batch + rank * batch + np.arange(batch) for m in range(accumulation)])


# ---------------------------------------------------------------------------------------------------------------------
# The device step


@functools.cache
def _fused() -> types.SimpleNamespace:
    """Per-parameter updates compiled into one graph each (ms.jit over a HyperMap).

    In PyNative every op costs ~40-80 us of dispatch on CPU whatever its size, and mindone's GradClipper
    (clip_by_global_norm), a grad norm, the loss scaler's unscale and EMAModel.step each issue one to four ops per
    parameter. Measured on the tiny UNet (208 parameters, 2-core CPU): grad norm + clip 140-250 -> 4.4 ms, EMA 50-77
    -> 9 ms per optimizer step; compiling takes ~0.5 s once per process."""
    import mindspore as ms
    from mindspore import nn, ops

    hyper_map = ops.HyperMap()
    square_sum = ops.MultitypeFuncGraph("square_sum")
    scale = ops.MultitypeFuncGraph("scale")
    ema_pull = ops.MultitypeFuncGraph("ema_pull")

    @square_sum.register("Tensor")
    def _(g):
        g = ops.cast(g, ms.float32)
        return (g * g).sum()

    @scale.register("Tensor", "Tensor")
    def _(factor, g):
        return g * ops.cast(factor, g.dtype)

    @ema_pull.register("Tensor", "Tensor", "Tensor")
    def _(weight, shadow, param):
        return ops.assign_sub(shadow, (shadow - param) * ops.cast(weight, shadow.dtype))

    @ms.jit
    def clip(grads, max_norm, loss_scale):
        grads = hyper_map(ops.partial(scale, 1 / loss_scale), grads)
        norm = ops.sqrt(ops.addn(hyper_map(square_sum, grads)))
        return norm, hyper_map(ops.partial(scale, max_norm / ops.maximum(norm, max_norm)), grads)

    def clip_grad_norm(grads, max_norm, loss_scale):
        """Unscale by the loss scale, then (pre-clip global norm, grads * max_norm / max(norm, max_norm)):
        mindspore's clip_by_global_norm rule. mutable: a plain tuple of tensors is a compile-time constant to
        ms.jit, recompiled for every new one."""
        return clip(ms.mutable(tuple(grads)), max_norm, loss_scale)

    class EMAUpdate(nn.Cell):
        """shadow -= (1 - decay) * (shadow - param) for every pair; Parameters held as attributes so the graph
        updates them in place."""

        def __init__(self, shadows, params):
            super().__init__(auto_prefix=False)
            self.shadows, self.params = ms.ParameterTuple(shadows), ms.ParameterTuple(params)

        @ms.jit
        def construct(self, weight):
            return hyper_map(ops.partial(ema_pull, weight), self.shadows, self.params)

    return types.SimpleNamespace(clip_grad_norm=clip_grad_norm, EMAUpdate=EMAUpdate)


def build_ema(params, **kwargs):
    """mindone's EMAModel(params, **kwargs) whose step is one compiled update (mindone's own `foreach` fast path is
    NotImplemented)."""
    import mindspore as ms

    from mindone.diffusers.training_utils import EMAModel

    class ForeachEMA(EMAModel):
        _update, _update_for = None, None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for shadow in self.shadow_params:  # clones keep the weights' names; one graph needs unique ones
                shadow.name = "ema." + shadow.name

        def step(self, parameters):
            parameters = list(parameters)
            self.optimization_step += 1
            self.cur_decay_value = decay = self.get_decay(self.optimization_step)
            key = tuple(map(id, self.shadow_params + parameters))
            if self._update_for != key:
                self._update, self._update_for = _fused().EMAUpdate(self.shadow_params, parameters), key
            self._update(ms.Tensor(1 - decay, ms.float32))

    return ForeachEMA(params, **kwargs)


def build_train_step(unet, optimizer, loss_scaler, max_grad_norm, accumulation, jit=True):
    """mindone's TrainStep (accumulation, unscale, overflow skip) plus the grad norm and whether it stepped; clipping
    by `_fused`'s compiled clip_grad_norm, which also yields the norm.

    jit: the forward+backward runs as one ms.jit graph instead of ~1000 PyNative ops. Tiny UNet, batch 2, 16x16
    latents on the 2-core CPU: ~68 ms vs ~175-200 ms per forward+backward, after ~12 s of compiling once."""
    import mindspore as ms

    from mindone.diffusers.training_utils import TrainStep

    clip_grad_norm = _fused().clip_grad_norm

    class UNetTrainStep(TrainStep):
        clip_norm = ms.Tensor(max_grad_norm, ms.float32)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if jit:
                self.forward_and_backward = ms.jit(self.forward_and_backward)

        def forward(self, noisy, timesteps, states, target, weights):
            pred = self.model(noisy, timesteps, states)[0].float()
            per_sample = ((pred - target) ** 2).mean(axis=(1, 2, 3))
            loss = (per_sample * weights).mean()
            return self.scale_loss(loss), per_sample

        def construct(self, *inputs):
            outputs, grads = self.forward_and_backward(*inputs)
            grads = self.grad_accumulator.step(grads)
            grad_norm = ms.Tensor(-1.0, ms.float32)
            stepped = False
            if self.sync_gradients:
                # Unscaled in the clip's graph (mindone's grad_scaler.unscale is one PyNative op per parameter).
                # The pre-clip norm, as accelerate's clip_grad_norm_ reports it; inf/nan on an overflowed step.
                grad_norm, grads = clip_grad_norm(grads, self.clip_norm, self.grad_scaler.loss_scaler.scale_value)
                stepped = self.grad_scaler.step(self.optimizer, grads)
                self.grad_scaler.update()
                self.grad_accumulator.zero_grad()
            return self.unscale_loss(outputs[0]) * self.grad_accumulator.gradient_accumulation_steps, grad_norm, stepped

    return UNetTrainStep(
        unet,
        optimizer,
        loss_scaler=loss_scaler,
        max_grad_norm=None,
        gradient_accumulation_steps=accumulation,
        gradient_accumulation_kwargs={"sync_with_dataloader": False},
    )


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def _params_of(obj):
    """name -> Parameter of a Cell, or of a plain object holding Parameters (mindspore.amp's loss scalers)."""
    import mindspore as ms

    if isinstance(obj, ms.nn.Cell):
        return dict(obj.parameters_and_names())
    return {name: v for name, v in vars(obj).items() if isinstance(v, ms.Parameter)}


def _state_of(obj, skip=()):
    """Parameter values by name, leaving out the Parameter objects in `skip` (e.g. the UNet's, saved apart)."""
    skip_ids = {id(p) for p in skip}
    return {name: p.asnumpy() for name, p in _params_of(obj).items() if id(p) not in skip_ids}


def _load_state(obj, state):
    import mindspore as ms

    params = _params_of(obj)
    for name, value in state.items():
        params[name].set_data(ms.Tensor(value))


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


def save_checkpoint(t, step):
    from safetensors.numpy import save_file

    cfg = t["config"]
    final = Path(cfg.output_dir) / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        t["unet"].save_pretrained(str(tmp / "unet"))
        # The lr list is rebuilt from the config (so a resume may extend --max_train_steps); the rest is state.
        skip = list(t["unet"].get_parameters()) + list(t["optimizer"].learning_rate.get_parameters())
        save_file(_state_of(t["optimizer"], skip=skip), str(tmp / "optimizer.safetensors"))
        save_file(_state_of(t["train_step"].grad_scaler.loss_scaler), str(tmp / "loss_scaler.safetensors"))
        if t["ema"] is not None:
            ema = t["ema"]
            save_file({n: s.asnumpy() for n, s in zip(t["param_names"], ema.shadow_params)}, str(tmp / "ema.safetensors"))
            state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            atomic_write_json(tmp / "ema_state.json", state)
        epoch, position = divmod(step, t["steps_per_epoch"])
        atomic_write_json(tmp / "trainer_state.json", {
            "step": step, "epoch": epoch, "position_in_epoch": position,
            "samples_seen": step * t["global_batch"], "skipped_steps": t["skipped_steps"],
            "rng": {"numpy": f"default_rng([seed={cfg.seed}, step]) per optimizer step; next step {step}",
                    "mindspore_seed": cfg.seed},
        })
        atomic_write_json(tmp / "config.json", cfg.public_dict())
    if cfg.checkpoints_total_limit is not None:
        # Prune only now that the new checkpoint is complete: a crash above leaves every older one intact.
        for _, old in list_checkpoints(cfg.output_dir)[: -cfg.checkpoints_total_limit]:
            shutil.rmtree(old)
    return final


def load_checkpoint(t, path):
    import mindspore as ms
    from safetensors.numpy import load_file

    cfg = t["config"]
    saved = json.loads((path / "config.json").read_text())
    changed = [k for k in RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
    if changed:
        detail = ", ".join(f"--{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ValueError(f"--resume_from_checkpoint {path}: cannot resume with changed {detail}")
    weights = load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))
    for name, p in t["unet"].parameters_and_names():
        p.set_data(ms.Tensor(weights[name]))
    _load_state(t["optimizer"], load_file(str(path / "optimizer.safetensors")))
    _load_state(t["train_step"].grad_scaler.loss_scaler, load_file(str(path / "loss_scaler.safetensors")))
    if t["ema"] is not None:
        if not (path / "ema.safetensors").is_file():
            raise ValueError(f"--use_ema: checkpoint {path} was saved without EMA weights")
        shadow = load_file(str(path / "ema.safetensors"))
        for name, s in zip(t["param_names"], t["ema"].shadow_params):
            s.set_data(ms.Tensor(shadow[name]))
        state = json.loads((path / "ema_state.json").read_text())
        t["ema"].load_state_dict(state)
    state = json.loads((path / "trainer_state.json").read_text())
    t["skipped_steps"] = state["skipped_steps"]
    return state["step"]


# ---------------------------------------------------------------------------------------------------------------------
# Validation


@contextlib.contextmanager
def inference(unet, jit=False):
    """Eval mode without gradient recording, and with --jit the UNet's forward compiled (models.compiled).

    The train step marks the UNet set_grad(); a PyNative forward of such a cell records its graph for a backward
    that never comes, and that memory was not released (measured: +2.3 GB per validation pass of 16 latents at
    32x32)."""
    from t2i import models

    unet.set_train(False)
    unet.set_grad(False)
    try:
        with models.compiled(unet) if jit else contextlib.nullcontext():
            yield
    finally:
        unet.set_grad(True)
        unet.set_train(True)


def validation_losses(t) -> dict:
    """Unweighted loss on the held-out samples with noise and timesteps fixed by the seed (comparable across steps),
    and the same loss with every sample paired with the next held-out sample's caption: a model that uses the text
    should do worse on the second."""
    import mindspore as ms

    if len(t["val_slots"]) == 0:
        return {"val_loss": None, "val_loss_shuffled": None}
    moments, text, _ = t["store"].read(t["val_slots"])
    rng = np.random.default_rng([t["config"].seed, 99])
    per_sample_t = 4
    moments = np.repeat(moments[:, 0], per_sample_t, axis=0)
    states = np.repeat(text[:, 0], per_sample_t, axis=0).astype(np.float32)
    eps = rng.standard_normal((len(moments), moments.shape[1] // 2) + moments.shape[2:], dtype=np.float32)
    x0 = losses.sample_latents(moments, eps, t["scaling_factor"])
    noise = rng.standard_normal(x0.shape, dtype=np.float32)
    n_t = t["num_train_timesteps"]
    timesteps = ((np.arange(len(x0)) % per_sample_t + rng.random(len(x0))) * n_t / per_sample_t).astype(np.int32)
    noisy = losses.add_noise(x0, noise, timesteps, t["alphas_cumprod"]).astype(np.float32)
    tgt = losses.target(x0, noise, timesteps, t["alphas_cumprod"], t["prediction_type"])
    result = {}
    with inference(t["unet"], t["config"].jit):
        for key, captions in (("val_loss", states), ("val_loss_shuffled", np.roll(states, per_sample_t, axis=0))):
            pred = t["unet"](ms.Tensor(noisy), ms.Tensor(timesteps), ms.Tensor(captions), return_dict=False)[0]
            pred = pred.float().asnumpy()
            result[key] = float(((pred - tgt) ** 2).mean())
    return result


def render_validation(t, step):
    """Render the validation prompts with the current (EMA if used) UNet into one PNG grid."""
    import mindspore as ms
    from PIL import Image

    from mindone.diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    cfg = t["config"]
    if not t.get("pipeline_parts"):
        from t2i import models

        tokenizer, text_encoder = models.load_text_encoder(cfg.pretrained_model_name_or_path)
        vae = models.load_vae(cfg.pretrained_model_name_or_path)
        scheduler = DPMSolverMultistepScheduler.from_pretrained(cfg.pretrained_model_name_or_path, subfolder="scheduler")
        t["pipeline_parts"] = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    params = t["unet"].trainable_params()
    backup = None
    if t["ema"] is not None:
        backup = [p.asnumpy() for p in params]
        t["ema"].copy_to(params)
    pipe = StableDiffusionPipeline(
        unet=t["unet"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        **t["pipeline_parts"],
    )
    pipe.set_progress_bar_config(disable=True)
    size = t["store"].attrs["resolution"]
    with inference(t["unet"], cfg.jit):
        images = [
            pipe(prompt, height=size, width=size, num_inference_steps=cfg.validation_inference_steps,
                 generator=np.random.default_rng(cfg.seed))[0][0]
            for prompt in cfg.validation_prompts
        ]
    if backup is not None:
        for p, value in zip(params, backup):
            p.set_data(ms.Tensor(value))
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(images), h), "white")
    for i, img in enumerate(images):
        grid.paste(img, (i * w, 0))
    path = Path(cfg.output_dir) / "validation" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Final output


def last_model_file() -> Path:
    return Path(os.environ.get("T2I_HOME", Path.home() / ".cache" / "t2i")) / "last_model"


def save_pipeline(t):
    """Make output_dir a diffusers pipeline: untouched components copied byte for byte, the trained (EMA) UNet."""
    cfg = t["config"]
    out = Path(cfg.output_dir)
    src = Path(cfg.pretrained_model_name_or_path)
    for component in PIPELINE_COMPONENTS:
        with atomic_dir(out / component) as tmp:
            shutil.copytree(src / component, tmp, dirs_exist_ok=True)
            if component == "scheduler" and t["prediction_type"] != t["base_prediction_type"]:
                config_file = tmp / "scheduler_config.json"
                sched = json.loads(config_file.read_text())
                sched["prediction_type"] = t["prediction_type"]
                config_file.write_text(json.dumps(sched, indent=2))
    if t["ema"] is not None:
        t["ema"].copy_to(t["unet"].trainable_params())
    with atomic_dir(out / "unet") as tmp:
        t["unet"].save_pretrained(str(tmp))
    index = json.loads((src / "model_index.json").read_text())
    atomic_write_json(out / "model_index.json", index)
    last = last_model_file()
    last.parent.mkdir(parents=True, exist_ok=True)
    last.write_text(str(out.resolve()))


# ---------------------------------------------------------------------------------------------------------------------
# setup -> fit


def setup(config: TrainConfig):
    import mindspore as ms
    from mindspore import nn
    from mindspore.amp import DynamicLossScaler, auto_mixed_precision

    from mindone.diffusers import DDPMScheduler
    from mindone.diffusers.optimization import get_scheduler
    from mindone.diffusers.training_utils import set_seed

    from t2i import models, runtime
    from t2i.store import LatentStore

    target = runtime.setup(config.device_target)
    if config.mixed_precision == "bf16" and target == "CPU":
        raise ValueError("--mixed_precision bf16: MindSpore's CPU backend has no bf16 matmul; use no or fp16 on CPU")
    rank, world = runtime.init_distributed() if config.distributed else (0, 1)
    set_seed(config.seed)
    model_dir = models.check_model_dir(config.pretrained_model_name_or_path)
    store = LatentStore.open(config.latent_store)
    fingerprint = models.fingerprint(model_dir)
    if store.attrs["model_fingerprint"] != fingerprint:
        raise ValueError(
            f"--latent_store {config.latent_store} was encoded with a different VAE/text encoder than "
            f"{model_dir} (fingerprint {store.attrs['model_fingerprint'][:12]} != {fingerprint[:12]}); "
            "re-run t2i-precompute with this model"
        )
    train_slots, val_slots = split_holdout(store.valid_slots(), config.num_validation_samples, config.seed)
    global_batch = config.train_batch_size * config.gradient_accumulation_steps * world
    steps_per_epoch = len(train_slots) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"--train_batch_size x --gradient_accumulation_steps x workers = {global_batch} exceeds the "
            f"{len(train_slots)} "
            f"training samples in {config.latent_store} ({len(val_slots)} held out by --num_validation_samples)"
        )
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch

    noise_scheduler = DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler")
    base_prediction = noise_scheduler.config.prediction_type
    unet = models.load_unet(model_dir)
    if unet.config.cross_attention_dim != store.attrs["text_shape"][1]:
        raise ValueError(
            f"UNet cross_attention_dim {unet.config.cross_attention_dim} != store text width {store.attrs['text_shape'][1]}"
        )
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.enable_xformers_memory_efficient_attention:
        print(models.enable_memory_efficient_attention(unet, target))
    unet.set_train(True)
    params = unet.trainable_params()
    # Structural names: Parameter.name changes once the UNet is wrapped in the train step cell.
    names = {id(p): name for name, p in unet.parameters_and_names()}
    param_names = [names[id(p)] for p in params]
    lr = config.learning_rate * (global_batch if config.scale_lr else 1)
    schedule = get_scheduler(config.lr_scheduler, lr=lr, num_warmup_steps=config.lr_warmup_steps,
                             num_training_steps=max_steps)
    optimizer = nn.AdamWeightDecay(
        params, learning_rate=schedule, beta1=config.adam_beta1, beta2=config.adam_beta2, eps=config.adam_epsilon,
        weight_decay=config.adam_weight_decay,
    )
    ema = None
    if config.use_ema:
        ema = build_ema(params, decay=config.ema_decay, model_cls=type(unet), model_config=unet.config)
    compute = {"fp16": ms.float16, "bf16": ms.bfloat16}.get(config.mixed_precision)
    step_net = unet
    loss_scaler = None
    if compute is not None:
        # O2: the UNet computes in half precision while its fp32 parameters stay the optimizer's master weights.
        step_net = auto_mixed_precision(unet, amp_level="O2", dtype=compute)
        if compute == ms.float16:
            loss_scaler = DynamicLossScaler(scale_value=2.0**16, scale_factor=2, scale_window=2000)
    train_step = build_train_step(step_net, optimizer, loss_scaler, config.max_grad_norm,
                                  config.gradient_accumulation_steps, config.jit)
    return {
        "config": config, "store": store, "unet": unet, "optimizer": optimizer, "ema": ema,
        "train_step": train_step, "param_names": param_names, "schedule": schedule,
        "train_slots": train_slots, "val_slots": val_slots, "global_batch": global_batch,
        "rank": rank, "world": world, "latent_shape": tuple(store.attrs["latent_shape"]),
        "steps_per_epoch": steps_per_epoch, "max_steps": max_steps, "skipped_steps": 0,
        "scaling_factor": store.scaling_factor,
        "alphas_cumprod": noise_scheduler.alphas_cumprod.asnumpy().astype(np.float64),
        "num_train_timesteps": noise_scheduler.config.num_train_timesteps,
        "prediction_type": config.prediction_type or base_prediction, "base_prediction_type": base_prediction,
    }


class Logger:
    """JSON-lines log of every step (the record resume is checked against) plus optional TensorBoard scalars."""

    def __init__(self, config: TrainConfig, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        config.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = config.log_dir / "train_log.jsonl"
        kept = []
        if self.path.is_file():
            # Steps after the resume point were never checkpointed: they will be redone, so their lines go.
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        if config.report_to == "tensorboard":
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(config.log_dir))

    def log(self, step, **values):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if value is not None and np.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def fit(t, start_step, logger):
    import mindspore as ms
    from tqdm import tqdm

    cfg = t["config"]
    store = t["store"]
    micro = cfg.train_batch_size
    order_epoch, order = None, None
    # This worker's positions in every global batch: fixed for the run.
    mine = rank_indices(t["rank"], t["world"], micro, cfg.gradient_accumulation_steps)
    history = []
    main = t["rank"] == 0
    bar = tqdm(total=t["max_steps"], initial=start_step, desc="train", unit="step", disable=not main)
    for step in range(start_step, t["max_steps"]):
        tick = time.perf_counter()
        epoch, position = divmod(step, t["steps_per_epoch"])
        if epoch != order_epoch:
            order_epoch, order = epoch, epoch_order(t["train_slots"], store.chunk_rows, cfg.seed, epoch)
        slots = order[position * t["global_batch"] : (position + 1) * t["global_batch"]]
        draws = draw(np.random.default_rng([cfg.seed, step]), t["global_batch"], t["latent_shape"], cfg,
                     t["num_train_timesteps"])
        draws = {k: v[mine] for k, v in draws.items()}
        batch = make_batch(store.read(slots[mine]), draws, t["scaling_factor"], t["alphas_cumprod"], cfg,
                           t["prediction_type"])
        step_loss = 0.0
        for m in range(cfg.gradient_accumulation_steps):
            part = [ms.Tensor(x[m * micro : (m + 1) * micro]) for x in batch]
            loss, grad_norm, stepped = t["train_step"](*part)
            step_loss += float(loss.asnumpy()) / cfg.gradient_accumulation_steps
        if not stepped:
            t["skipped_steps"] += 1
        elif t["ema"] is not None:
            t["ema"].step(t["unet"].trainable_params())
        lr = float(t["schedule"][min(int(t["optimizer"].global_step.asnumpy().reshape(-1)[0]), len(t["schedule"]) - 1)])
        scale = float(t["train_step"].grad_scaler.loss_scaler.scale_value.asnumpy())
        done = step + 1
        record = {"loss": step_loss, "lr": lr, "grad_norm": float(grad_norm.asnumpy()), "loss_scale": scale,
                  "skipped_steps": t["skipped_steps"],
                  "samples_per_s": t["global_batch"] / (time.perf_counter() - tick)}
        if main and cfg.validation_steps and (done % cfg.validation_steps == 0 or done == t["max_steps"]):
            record.update(validation_losses(t))
            if cfg.validation_prompts:
                record["validation_image"] = str(render_validation(t, done))
        logger.log(done, **{k: v for k, v in record.items() if not isinstance(v, str)})
        history.append({"step": done, **record})
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", sps=f"{record['samples_per_s']:.1f}")
        bar.update(1)
        if main and done % cfg.checkpointing_steps == 0:
            # Data parallel keeps every rank's weights and optimizer state identical: one writer is enough.
            save_checkpoint(t, done)
    bar.close()
    return history


def run(config: TrainConfig) -> dict:
    """Train the UNet; returns the per-step history and where the pipeline was written."""
    print(json.dumps(config.public_dict(), indent=2))
    t = setup(config)
    resume = resolve_resume(config)
    start = load_checkpoint(t, resume) if resume else 0
    if resume:
        print(f"resumed from {resume} at step {start}")
    out = Path(config.output_dir)
    main = t["rank"] == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", config.public_dict())
    print(f"rank {t['rank']}/{t['world']}: {len(t['train_slots'])} training samples, {len(t['val_slots'])} held out; {t['global_batch']} per step; "
          f"{t['steps_per_epoch']} steps per epoch; training steps {start} -> {t['max_steps']}")
    logger = Logger(config, start, enabled=main)
    try:
        history = fit(t, start, logger)
    finally:
        logger.close()
    if not main:
        return {"history": history, "start_step": start, "final_step": t["max_steps"], "output_dir": out,
                "skipped_steps": t["skipped_steps"]}
    # The last step's validation, when it ran, saw these very weights: no need to run it again.
    last = history[-1] if history and history[-1]["step"] == t["max_steps"] else {}
    val = {k: last[k] for k in ("val_loss", "val_loss_shuffled")} if "val_loss" in last else validation_losses(t)
    final_val, final_val_shuffled = val["val_loss"], val["val_loss_shuffled"]
    save_pipeline(t)
    grids = sorted((out / "validation").glob("step-*.png"))
    write_model_card(
        out, base_model=config.pretrained_model_name_or_path,
        dataset=t["store"].attrs.get("dataset") or config.latent_store, config=config.public_dict(),
        steps=t["max_steps"], final_loss=history[-1]["loss"] if history else None, val_loss=final_val,
        validation_image=grids[-1] if grids else None,
    )
    print(f"wrote pipeline to {out}; skipped steps {t['skipped_steps']}; "
          f"val loss {final_val} (shuffled captions {final_val_shuffled})")
    if config.push_to_hub:
        # Last: the local output is complete whatever happens to the upload.
        print(f"uploaded to {push_to_hub(out, config.hub_model_id, token=config.hub_token)}")
    return {"history": history, "start_step": start, "final_step": t["max_steps"], "output_dir": out,
            "val_loss": final_val, "val_loss_shuffled": final_val_shuffled, "skipped_steps": t["skipped_steps"]}


@click.command(context_settings={"show_default": True})
@click.option("--pretrained_model_name_or_path", required=True, help="The base diffusers pipeline folder.")
@click.option("--latent_store", required=True, help="The zarr store written by t2i-precompute.")
@click.option("--output_dir", default="sd-model-finetuned")
@click.option("--seed", type=int, default=0)
@click.option("--train_batch_size", type=int, default=16)
@click.option("--num_train_epochs", type=int, default=100)
@click.option("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
@click.option("--gradient_accumulation_steps", type=int, default=1)
@click.option("--gradient_checkpointing", is_flag=True)
@click.option("--learning_rate", type=float, default=1e-4)
@click.option("--scale_lr", is_flag=True, help="Multiply the lr by batch size x accumulation steps (x workers).")
@click.option("--lr_scheduler", type=click.Choice(LR_SCHEDULERS), default="constant")
@click.option("--lr_warmup_steps", type=int, default=500)
@click.option("--adam_beta1", type=float, default=0.9)
@click.option("--adam_beta2", type=float, default=0.999)
@click.option("--adam_weight_decay", type=float, default=1e-2)
@click.option("--adam_epsilon", type=float, default=1e-8)
@click.option("--max_grad_norm", type=float, default=1.0)
@click.option("--snr_gamma", type=float, default=None, help="Min-SNR weighting gamma (5.0 recommended).")
@click.option("--prediction_type", type=click.Choice(["epsilon", "v_prediction"]), default=None,
              help="Default: the model scheduler's.")
@click.option("--noise_offset", type=float, default=0.0)
@click.option("--input_perturbation", type=float, default=0.0)
@click.option("--mixed_precision", type=click.Choice(["no", "fp16", "bf16"]), default="no")
@click.option("--use_ema", is_flag=True)
@click.option("--ema_decay", type=float, default=0.9999)
@click.option("--checkpointing_steps", type=int, default=500)
@click.option("--checkpoints_total_limit", type=int, default=None)
@click.option("--resume_from_checkpoint", default=None, help="A checkpoint-N folder, or 'latest'.")
@click.option("--validation_prompts", multiple=True, help="Repeatable; rendered every --validation_steps.")
@click.option("--validation_steps", type=int, default=None)
@click.option("--validation_inference_steps", type=int, default=20)
@click.option("--num_validation_samples", type=int, default=4, help="Store samples held out for validation loss.")
@click.option("--logging_dir", default="logs", help="Relative to --output_dir.")
@click.option("--report_to", type=click.Choice(["tensorboard", "none"]), default="tensorboard")
@click.option("--distributed", is_flag=True, help="Data parallel over the workers started by msrun/mpirun.")
@click.option("--enable_xformers_memory_efficient_attention", is_flag=True,
              help="MindSpore flash attention where the backend has it (Ascend); says so when it does not.")
@click.option("--jit/--no_jit", default=True, show_default=True,
              help="Compile the UNet forward+backward into one graph (ms.jit): much faster steps after a one-off "
                   "compile (~12 s for the tiny model on CPU); --no_jit runs it op by op (PyNative).")
@click.option("--push_to_hub", is_flag=True, help="Upload the output folder to the Hub when training ends.")
@click.option("--hub_model_id", default=None)
@click.option("--hub_token", default=None)
@device_option
def cli(**kwargs):
    """Train the UNet of a Stable Diffusion pipeline on a t2i latent store."""
    kwargs["validation_prompts"] = tuple(kwargs["validation_prompts"])
    with cli_errors():
        run(TrainConfig(**kwargs))


if __name__ == "__main__":
    cli()
