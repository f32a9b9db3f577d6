"""Stage 2: train only the UNet (or LoRA adapters on it) on the cached latents of a t2i store.

Shape (litgpt): `run(config)` -> resume check -> `setup` (data, diffusion, model and optimizer) -> resume -> `fit`
(one flat loop, from a start step to a stop step) -> output. Beside it: the step's inputs (t2i.training.batch), the
compiled device step (t2i.training.step), checkpoints, validation and the run log (t2i.training), and the output
pipeline (t2i.interop.pipeline).
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from t2i.core.atomic import atomic_write_json
from t2i.core.flags import DEVICE_TARGET_HELP, check, command, flag, public_dict
from t2i.interop.hub import push_to_hub, resolve_model
from t2i.interop.lora import DEFAULT_TARGETS, check_lora_flags, targets
from t2i.interop.pipeline import CONFIG_NAME, SAMPLING_COMPONENTS, components_to_copy
from t2i.training.batch import Diffusion, draw, make_batch, one_ahead, rank_indices
from t2i.training.buckets import Buckets, CompileLog, StepBatches
from t2i.training.checkpoint import (
    TrainState,
    check_resume,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from t2i.training.rows import split_holdout
from t2i.training.runlog import Logger
from t2i.training.validation import ValidationImages, validation_losses

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
PRECISIONS = ("no", "fp16", "bf16")
IN_MEMORY_SHARE = 4  # a store is held in RAM when it fits 1/4 of the free memory (per worker)


@dataclass(frozen=True)
class TrainConfig:
    pretrained_model_name_or_path: str = flag(
        help="The base diffusers pipeline: a local folder or a Hub model id (fetched into the HF cache).")
    latent_store: str = flag(
        help="The zarr store written by t2i-precompute; of aspect buckets, each batch comes from one bucket.")
    revision: str | None = flag(None, "Branch, tag or commit of a Hub model id.")
    variant: str | None = flag(None, "Weights variant, e.g. fp16.")
    output_dir: str = flag("sd-model-finetuned", "Where the trained pipeline (or LoRA adapter), checkpoints and "
                                                 "logs go.")
    seed: int = flag(0, "Seeds every random draw: a run is a pure function of its flags.")
    train_batch_size: int = flag(16, "Samples per worker and accumulation step.", min=1)
    num_train_epochs: int = flag(100, min=1)
    max_train_steps: int | None = flag(None, "Optimizer steps; overrides --num_train_epochs.", min=1)
    gradient_accumulation_steps: int = flag(1, min=1)
    gradient_checkpointing: bool = flag(False, "Recompute activations in the backward pass: less memory, more time.")
    learning_rate: float = flag(1e-4, positive=True)
    scale_lr: bool = flag(False, "Multiply the lr by batch size x accumulation steps (x workers).")
    lr_scheduler: str = flag("constant", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = flag(500, min=0)
    adam_beta1: float = flag(0.9)
    adam_beta2: float = flag(0.999)
    adam_weight_decay: float = flag(1e-2)
    adam_epsilon: float = flag(1e-8)
    max_grad_norm: float = flag(1.0, positive=True)
    snr_gamma: float | None = flag(None, "Min-SNR weighting gamma (5.0 recommended).", positive=True)
    prediction_type: str | None = flag(None, "Default: the model scheduler's.", choices=("epsilon", "v_prediction"))
    noise_offset: float = flag(0.0)
    input_perturbation: float = flag(0.0)
    caption_dropout_probability: float = flag(
        0.0, "Train this share of samples on the empty prompt, for classifier-free guidance.", min=0, below=1)
    mixed_precision: str = flag("no", "UNet compute precision (fp16 with dynamic loss scaling).", choices=PRECISIONS)
    use_ema: bool = flag(False, "Keep an exponential moving average of the weights; the output holds it.")
    ema_decay: float = flag(0.9999)
    checkpointing_steps: int = flag(500, "Save a full-state checkpoint every N steps.", min=1)
    checkpoints_total_limit: int | None = flag(None, "Keep only the newest N checkpoints.", min=1)
    resume_from_checkpoint: str | None = flag(None, "A checkpoint-N folder, or 'latest'.")
    validation_prompts: tuple = flag((), "Prompts rendered at each validation, as a grid: several after one flag or "
                                         "the flag repeated.", greedy=True)
    validation_steps: int | None = flag(None, "Validate (held-out loss, and images of --validation_prompts) every N "
                                              "steps and at the end.", min=1)
    validation_epochs: int | None = flag(None, "Validate every N epochs (the seed script's flag); give it or "
                                               "--validation_steps.", min=1)
    validation_inference_steps: int = flag(20, min=1)
    validation_height: int | None = flag(None, "Validation images' height (default: the store's --resolution); any "
                                               "multiple of 8, e.g. one of a store's aspect buckets.", multiple_of=8)
    validation_width: int | None = flag(None, "Validation images' width (default: --resolution).", multiple_of=8)
    num_validation_samples: int = flag(4, "Store samples held out for validation loss.", min=0)
    logging_dir: str = flag("logs", "Relative to --output_dir.")
    report_to: str = flag("tensorboard", choices=("tensorboard", "none"))
    distributed: bool = flag(False, "Data parallel over the workers started by msrun/mpirun.")
    enable_xformers_memory_efficient_attention: bool = flag(
        False, "MindSpore flash attention where the backend has it (Ascend); says so when it does not.")
    jit: bool = flag(True, "Compile the UNet forward+backward into one graph (ms.jit): much faster steps after a "
                           "one-off compile (~12 s for the tiny model on CPU); --no_jit runs it op by op (PyNative).")
    push_to_hub: bool = flag(False, "Upload the output folder to the Hub when training ends.")
    hub_model_id: str | None = flag(None, "The Hub repo to upload to, e.g. your-name/sd-naruto-model.")
    hub_token: str | None = flag(None, "Hub token (default: the one huggingface-cli login saved); never written "
                                       "to any file.", secret=True)
    device_target: str | None = flag(None, DEVICE_TARGET_HELP)
    lora_rank: int | None = flag(None, "Train LoRA adapters of this rank instead of the whole UNet; the output is the "
                                       "adapter.", min=1)
    lora_alpha: float | None = flag(None, "LoRA scale alpha/rank; default: the rank.", positive=True)
    lora_target_modules: str = flag(",".join(DEFAULT_TARGETS), "Comma-separated UNet layer names the adapters wrap.")
    lora_dropout: float = flag(0.0, min=0, below=1)
    max_buckets: int = flag(16, "Refuse a --latent_store with more aspect buckets to train: each is one compile of "
                                "the step.", min=1)

    def __post_init__(self):
        check(self)
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/sd-naruto-model)")
        if self.validation_steps and self.validation_epochs:
            raise ValueError("--validation_steps and --validation_epochs both say when to validate: give one")
        if self.lora_rank is not None and self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", float(self.lora_rank))
        check_lora_flags(self.lora_rank, self.lora_alpha, self.lora_target_modules, self.lora_dropout)

    def public_dict(self) -> dict:
        """The config as printed and saved (config file, checkpoints, model card): the Hub token never leaves."""
        return public_dict(self)

    @property
    def log_dir(self) -> Path:
        return Path(self.output_dir) / self.logging_dir


@dataclass
class Data:
    """What the run trains and validates on: the store's buckets, this run's split and the order of its batches."""

    store: object  # t2i.data.store.LatentStore
    buckets: Buckets
    batches: StepBatches
    train_slots: np.ndarray
    val_slots: np.ndarray
    global_batch: int  # samples per optimizer step over all workers and accumulation steps
    empty_prompt: np.ndarray | None  # the store's empty-prompt text states, for --caption_dropout_probability
    empty_pooled: np.ndarray | None  # SDXL: its pooled embedding


@dataclass
class Run:
    """What `setup` builds for `fit`."""

    model_dir: Path  # the base pipeline folder: --pretrained_model_name_or_path, or its Hub snapshot
    data: Data
    diffusion: Diffusion
    state: TrainState
    schedule: list  # learning rate per optimizer step
    compile_log: CompileLog  # the train step's compile per latent shape
    max_steps: int
    base_prediction_type: str  # the base scheduler's; the output's scheduler says what was trained
    rank: int = 0
    world: int = 1


def setup_data(config: TrainConfig, model_dir: Path, world: int) -> Data:
    from t2i.core import runtime
    from t2i.data.store import LatentStore
    from t2i.interop import models

    store = LatentStore.open(config.latent_store)
    fingerprint = models.fingerprint(model_dir)
    if store.attrs["model_fingerprint"] != fingerprint:
        raise ValueError(
            f"--latent_store {config.latent_store} was encoded with a different VAE/text encoder than "
            f"{model_dir} (fingerprint {store.attrs['model_fingerprint'][:12]} != {fingerprint[:12]}); "
            "re-run t2i-precompute with this model"
        )
    empty_prompt = store.empty_prompt() if config.caption_dropout_probability else None
    empty_pooled = store.empty_pooled() if config.caption_dropout_probability else None
    if config.caption_dropout_probability and empty_prompt is None:
        raise ValueError(f"--caption_dropout_probability: {config.latent_store} has no empty-prompt text states (made "
                         "by an older t2i); re-run t2i-precompute with the same flags to add them")
    buckets = Buckets.of(store)
    train_slots, val_slots = split_holdout(buckets.valid_slots(), config.num_validation_samples, config.seed)
    global_batch = config.train_batch_size * config.gradient_accumulation_steps * world
    batches = StepBatches(buckets, buckets.split(train_slots), global_batch, config.seed)
    batches.check(config.max_buckets, config.latent_store, len(val_slots))
    # A store that fits (IN_MEMORY_SHARE) is read into RAM once: a batch is then an index into NumPy arrays instead
    # of a zarr read each step, which on a small model is a visible share of the step.
    if buckets.nbytes <= runtime.available_memory() // (IN_MEMORY_SHARE * world):
        buckets.hold_in_memory()
    print(f"latents: {buckets.nbytes / 2**20:.1f} MB, "
          f"{'held in memory' if buckets.readers else 'read from the store each step'}")
    return Data(store, buckets, batches, train_slots, val_slots, global_batch, empty_prompt, empty_pooled)


def setup_diffusion(config: TrainConfig, model_dir: Path, store) -> tuple:
    """(what is trained, the base scheduler's prediction type)."""
    from mindone.diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler")
    base = scheduler.config.prediction_type
    if config.lora_rank and config.prediction_type not in (None, base):
        raise ValueError(f"--prediction_type {config.prediction_type} with --lora_rank: a LoRA file carries no "
                         f"scheduler, so it must be trained for the base's {base}")
    alphas = scheduler.alphas_cumprod.asnumpy().astype(np.float64)
    return Diffusion(alphas, config.prediction_type or base, store.scaling_factor), base


def setup_state(config: TrainConfig, model_dir: Path, store, schedule, target: str) -> TrainState:
    """The UNet (with LoRA adapters), the optimizer, EMA and the compiled train step."""
    from t2i.interop import lora, models
    from t2i.training.optim import build_adamw
    from t2i.training.step import build_ema, build_train_step, mixed_precision

    unet = models.load_unet(model_dir, variant=config.variant)
    text_width = store.attrs["text_shape"][1]
    if unet.config.cross_attention_dim != text_width:
        raise ValueError(f"UNet cross_attention_dim {unet.config.cross_attention_dim} != store text width {text_width}")
    if (unet.config.addition_embed_type == "text_time") != store.sdxl:
        kind = "an SDXL" if store.sdxl else "an SD 1.x/2.x"
        raise ValueError(f"--latent_store {config.latent_store} is {kind} store but {model_dir}'s UNet is "
                         f"{'not ' if store.sdxl else ''}SDXL's; re-run t2i-precompute with this model")
    lora_config = None
    if config.lora_rank:
        lora_config = lora.add_adapters(unet, config.lora_rank, config.lora_alpha, targets(config.lora_target_modules),
                                        config.lora_dropout)
    if config.gradient_checkpointing:
        models.enable_gradient_checkpointing(unet)
    if config.enable_xformers_memory_efficient_attention:
        print(models.enable_memory_efficient_attention(unet, target))
    unet.set_train(True)
    params = unet.trainable_params()
    # Structural names: Parameter.name changes once the UNet is wrapped in the train step cell.
    names = {id(p): name for name, p in unet.parameters_and_names()}
    optimizer = build_adamw(params, schedule, beta1=config.adam_beta1, beta2=config.adam_beta2,
                            eps=config.adam_epsilon, weight_decay=config.adam_weight_decay, jit=config.jit)
    ema = build_ema(params, decay=config.ema_decay, model_cls=type(unet), model_config=unet.config) \
        if config.use_ema else None
    step_net, loss_scaler = mixed_precision(unet, models.DTYPES[config.mixed_precision], lora_config is not None)
    train_step = build_train_step(step_net, optimizer, loss_scaler, config.max_grad_norm,
                                  config.gradient_accumulation_steps, config.jit)
    return TrainState(unet, optimizer, train_step, ema, [names[id(p)] for p in params], lora_config)


def setup(config: TrainConfig) -> Run:
    from mindone.diffusers.optimization import get_scheduler
    from mindone.diffusers.training_utils import set_seed

    from t2i.core import runtime

    target = runtime.setup(config.device_target)
    if config.mixed_precision == "bf16" and target == "CPU":
        raise ValueError("--mixed_precision bf16: MindSpore's CPU backend has no bf16 matmul; use no or fp16 on CPU")
    rank, world = runtime.init_distributed() if config.distributed else (0, 1)
    set_seed(config.seed)
    # A LoRA run writes only the adapter: the base's safety checker and feature extractor are not needed.
    model_dir = resolve_model(config.pretrained_model_name_or_path,
                              components=SAMPLING_COMPONENTS if config.lora_rank else None,
                              revision=config.revision, variant=config.variant)
    if not config.lora_rank:
        components_to_copy(model_dir)  # a component the output would lack fails now, not after training
    data = setup_data(config, model_dir, world)
    max_steps = config.max_train_steps or config.num_train_epochs * data.batches.steps_per_epoch
    diffusion, base_prediction = setup_diffusion(config, model_dir, data.store)
    lr = config.learning_rate * (data.global_batch if config.scale_lr else 1)
    schedule = get_scheduler(config.lr_scheduler, lr=lr, num_warmup_steps=config.lr_warmup_steps,
                             num_training_steps=max_steps)
    state = setup_state(config, model_dir, data.store, schedule, target)
    return Run(model_dir, data, diffusion, state, schedule, CompileLog(config.jit), max_steps, base_prediction, rank,
               world)


def fit(cfg: TrainConfig, run: Run, start: int, stop: int, logger: Logger, validate=None, checkpoint=None) -> list:
    """Optimizer steps start..stop-1; `validate(step)` (a dict for the log) every --validation_steps and at
    run.max_steps, `checkpoint(step)` every --checkpointing_steps (both on the main worker). Returns the step
    records."""
    import mindspore as ms
    from tqdm import tqdm

    data, state = run.data, run.state
    micro = cfg.train_batch_size
    # This worker's positions in every global batch: fixed for the run.
    mine = rank_indices(run.rank, run.world, micro, cfg.gradient_accumulation_steps)
    main = run.rank == 0
    every = cfg.validation_steps or (cfg.validation_epochs or 0) * data.batches.steps_per_epoch
    history = []

    def host_batch(step):
        """This worker's share of the step's inputs, as NumPy: a pure function of (seed, step)."""
        bucket, slots = data.batches.at(step)
        draws = draw(np.random.default_rng([cfg.seed, step]), data.global_batch, data.buckets.latent_shapes[bucket],
                     cfg, run.diffusion.num_train_timesteps)
        draws = {k: v[mine] for k, v in draws.items()}
        return bucket, make_batch(data.buckets.read(bucket, slots[mine]), draws, run.diffusion, cfg,
                                  data.empty_prompt, data.empty_pooled)

    bar = tqdm(total=stop, initial=start, desc="train", unit="step", disable=not main)
    batches = one_ahead(host_batch, start, stop)
    for step in range(start, stop):
        tick = time.perf_counter()
        bucket, batch = next(batches)
        latent_shape = data.buckets.latent_shapes[bucket]
        new_shape = run.compile_log.is_new(latent_shape)
        step_loss = 0.0
        for m in range(cfg.gradient_accumulation_steps):
            part = [ms.Tensor(x) for x in batch.rows(slice(m * micro, (m + 1) * micro)).arrays()]
            loss, grad_norm, stepped = state.train_step(*part)
            step_loss += float(loss.asnumpy()) / cfg.gradient_accumulation_steps
        compiled = run.compile_log.note(data.buckets.sizes[bucket], latent_shape, time.perf_counter() - tick, main) \
            if new_shape else {}
        if not stepped:
            state.skipped_steps += 1
        elif state.ema is not None:
            state.ema.step(state.unet.trainable_params())
        lr = float(run.schedule[min(int(state.optimizer.global_step.asnumpy().reshape(-1)[0]), len(run.schedule) - 1)])
        scale = float(state.loss_scaler.scale_value.asnumpy())
        done = step + 1
        record = {"loss": step_loss, "lr": lr, "grad_norm": float(grad_norm.asnumpy()), "loss_scale": scale,
                  "skipped_steps": state.skipped_steps,
                  "samples_per_s": data.global_batch / (time.perf_counter() - tick), **compiled}
        if main and validate is not None and every and (done % every == 0 or done == run.max_steps):
            record.update(validate(done))
        logger.log(done, **{k: v for k, v in record.items() if not isinstance(v, str)})
        history.append({"step": done, **record})
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", sps=f"{record['samples_per_s']:.1f}")
        bar.update(1)
        if main and checkpoint is not None and done % cfg.checkpointing_steps == 0:
            # Data parallel keeps every rank's weights and optimizer state identical: one writer is enough.
            checkpoint(done)
    batches.close()
    bar.close()
    return history


def hooks(config: TrainConfig, run: Run):
    """(validate, checkpoint) for `fit`: what the main worker does every --validation_steps and
    --checkpointing_steps."""
    data, state = run.data, run.state
    size = data.store.attrs["resolution"]
    images = ValidationImages(run.model_dir, config.validation_prompts, config.validation_height or size,
                              config.validation_width or size, config.validation_inference_steps, config.seed,
                              run.diffusion.prediction_type, Path(config.output_dir) / "validation", config.variant,
                              config.jit)

    def validate(step):
        record = validation_losses(state.unet, data.buckets, data.val_slots, run.diffusion, config.seed, config.jit)
        if config.validation_prompts:
            record["validation_image"] = str(images(state.unet, state.ema, step))
        return record

    def checkpoint(step):
        epoch, position = divmod(step, data.batches.steps_per_epoch)
        progress = {"epoch": epoch, "position_in_epoch": position, "samples_seen": step * data.global_batch,
                    "rng": {"numpy": f"default_rng([seed={config.seed}, step]) per optimizer step; next step {step}",
                            "mindspore_seed": config.seed}}
        save_checkpoint(state, Path(config.output_dir) / f"checkpoint-{step}", step, progress, config.public_dict())
        if config.checkpoints_total_limit is not None:
            prune_checkpoints(config.output_dir, config.checkpoints_total_limit)

    return validate, checkpoint


def write_output(config: TrainConfig, run: Run, final_loss, val_loss):
    """The output folder: the trained (EMA) UNet as a pipeline, or the adapter, and its model card."""
    from t2i.interop import lora
    from t2i.interop.modelcard import write_model_card
    from t2i.interop.pipeline import save_output

    state, out = run.state, Path(config.output_dir)
    if state.ema is not None:
        state.ema.copy_to(state.unet.trainable_params())
    prediction = run.diffusion.prediction_type
    save_output(state.unet, run.model_dir, out, state.lora_config,
                prediction_type=prediction if prediction != run.base_prediction_type else None, variant=config.variant)
    grids = sorted((out / "validation").glob("step-*.png"))
    write_model_card(
        out, base_model=config.pretrained_model_name_or_path,
        dataset=run.data.store.attrs.get("dataset") or config.latent_store, config=config.public_dict(),
        steps=run.max_steps, final_loss=final_loss, val_loss=val_loss, validation_image=grids[-1] if grids else None,
        lora=lora.describe(state.lora_config) if state.lora_config is not None else None,
        pipeline_class="StableDiffusionXLPipeline" if run.data.store.sdxl else "StableDiffusionPipeline",
    )


def run(config: TrainConfig) -> dict:
    """Train the UNet; returns the per-step history and where the pipeline was written."""
    print(json.dumps(config.public_dict(), indent=2))
    # Checked before anything loads: a resume with changed settings fails in seconds.
    resume = resolve_resume(config.resume_from_checkpoint, config.output_dir)
    if resume:
        check_resume(resume, config.public_dict())
    r = setup(config)
    start = load_checkpoint(r.state, resume) if resume else 0
    if resume:
        print(f"resumed from {resume} at step {start}")
    out = Path(config.output_dir)
    main = r.rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / CONFIG_NAME, config.public_dict())
    print(f"rank {r.rank}/{r.world}: {len(r.data.train_slots)} training samples, {len(r.data.val_slots)} held out; "
          f"{r.data.global_batch} per step; {r.data.batches.steps_per_epoch} steps per epoch; "
          f"training steps {start} -> {r.max_steps}")
    validate, checkpoint = hooks(config, r)
    logger = Logger(config.log_dir, start, config.report_to, enabled=main)
    try:
        history = fit(config, r, start, r.max_steps, logger, validate, checkpoint)
    finally:
        logger.close()
    result = {"history": history, "start_step": start, "final_step": r.max_steps, "output_dir": out,
              "skipped_steps": r.state.skipped_steps}
    if not main:
        return result
    # The last step's validation, when it ran, saw these very weights: no need to run it again.
    last = history[-1] if history and history[-1]["step"] == r.max_steps else {}
    val = {k: last[k] for k in ("val_loss", "val_loss_shuffled")} if "val_loss" in last else \
        validation_losses(r.state.unet, r.data.buckets, r.data.val_slots, r.diffusion, config.seed, config.jit)
    write_output(config, r, history[-1]["loss"] if history else None, val["val_loss"])
    print(f"wrote pipeline to {out}; skipped steps {r.state.skipped_steps}; "
          f"val loss {val['val_loss']} (shuffled captions {val['val_loss_shuffled']})")
    if config.push_to_hub:
        # Last: the local output is complete whatever happens to the upload.
        print(f"uploaded to {push_to_hub(out, config.hub_model_id, token=config.hub_token)}")
    return {**result, "val_loss": val["val_loss"], "val_loss_shuffled": val["val_loss_shuffled"],
            "compiles": r.compile_log.compiles}


cli = command(TrainConfig, lambda config: run(config),
              "Train the UNet of a Stable Diffusion (1.x/2.x or XL) pipeline on a t2i latent store.")

if __name__ == "__main__":
    cli()
