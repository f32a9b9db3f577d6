"""Stage 2: train only the UNet on the cached latents of a t2i store.

Shape (litgpt): `run(config)` -> `setup` (device, store, models, optimizer) -> resume -> `fit` (one flat loop).
Beside it: the step's inputs (t2i.training.batch), the compiled device step (t2i.training.step), checkpoints (t2i.training.checkpoint),
validation (t2i.training.validation) and the output pipeline (t2i.interop.pipeline).
"""

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from t2i.core.atomic import atomic_write_json
from t2i.core.cli import REDACTED, cli_errors, config_file_option, device_option
from t2i.interop.hub import push_to_hub, resolve_model
from t2i.interop.lora import DEFAULT_TARGETS, check_lora_flags, lora_options, targets
from t2i.interop.pipeline import SAMPLING_COMPONENTS, components_to_copy, write_output
from t2i.training.batch import draw, make_batch, one_ahead, rank_indices
from t2i.training.buckets import Buckets, CompileLog, StepBatches
from t2i.training.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from t2i.training.rows import split_holdout
from t2i.training.runlog import Logger
from t2i.training.validation import render_validation, validation_losses

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
# The training config is saved beside the pipeline under a name no diffusers or transformers loader reads.
CONFIG_NAME = "t2i_train_config.json"
IN_MEMORY_SHARE = 4  # a store is held in RAM when it fits 1/4 of the free memory (per worker)


@dataclass(frozen=True)
class TrainConfig:
    pretrained_model_name_or_path: str
    latent_store: str
    revision: str | None = None
    variant: str | None = None
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
    caption_dropout_probability: float = 0.0
    mixed_precision: str = "no"
    use_ema: bool = False
    ema_decay: float = 0.9999
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_prompts: tuple = ()
    validation_steps: int | None = None
    validation_inference_steps: int = 20
    validation_height: int | None = None  # default: the store's --resolution
    validation_width: int | None = None
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
    lora_rank: int | None = None  # LoRA adapters instead of the full UNet
    lora_alpha: float | None = None  # default: the rank (scale 1)
    lora_target_modules: str = ",".join(DEFAULT_TARGETS)
    lora_dropout: float = 0.0
    max_buckets: int = 16

    def __post_init__(self):
        positive = ("train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "checkpointing_steps",
                    "validation_inference_steps", "max_buckets")
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
        if not 0 <= self.caption_dropout_probability < 1:
            raise ValueError(f"--caption_dropout_probability must be in [0, 1), got {self.caption_dropout_probability}")
        for name in ("validation_height", "validation_width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"--{name} must be a positive multiple of 8, got {value}")
        if self.num_validation_samples < 0 or self.lr_warmup_steps < 0:
            raise ValueError("--num_validation_samples and --lr_warmup_steps must be >= 0")
        if self.lora_rank is not None and self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", float(self.lora_rank))
        check_lora_flags(self.lora_rank, self.lora_alpha, self.lora_target_modules, self.lora_dropout)

    def public_dict(self) -> dict:
        """The config as printed and saved (config.json, checkpoints, model card): the Hub token never leaves."""
        d = dataclasses.asdict(self)
        if d["hub_token"]:
            d["hub_token"] = REDACTED
        return d

    @property
    def log_dir(self) -> Path:
        return Path(self.output_dir) / self.logging_dir


@dataclass
class Trainer:
    """What `setup` builds and `fit` runs; `skipped_steps` and the validation parts cache change along the way."""

    config: TrainConfig
    model_dir: Path  # the base pipeline folder: --pretrained_model_name_or_path, or its Hub snapshot
    store: object  # t2i.data.store.LatentStore
    unet: object  # mindone UNet2DConditionModel, the weights being trained
    optimizer: object
    ema: object | None  # mindone EMAModel (t2i.training.step.build_ema) when --use_ema
    train_step: object  # t2i.training.step.build_train_step
    param_names: list  # structural names of the trainable parameters, in optimizer order
    schedule: list  # learning rate per optimizer step
    train_slots: np.ndarray  # global slots (t2i.data.buckets.Buckets)
    val_slots: np.ndarray
    buckets: Buckets
    batches: StepBatches
    compile_log: CompileLog  # the train step's compile per latent shape
    global_batch: int  # samples per optimizer step over all workers and accumulation steps
    rank: int
    world: int
    max_steps: int
    scaling_factor: float
    alphas_cumprod: np.ndarray
    num_train_timesteps: int
    prediction_type: str  # what is trained: --prediction_type, else the base scheduler's
    base_prediction_type: str
    empty_prompt: np.ndarray | None = None  # the store's text states of "", for --caption_dropout_probability
    lora_config: object | None = None  # mindone.peft LoraConfig of the adapter being trained (--lora_rank)
    skipped_steps: int = 0
    validation_parts: dict | None = None  # VAE, text encoder, tokenizer; loaded at the first validation image

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(config: TrainConfig) -> Trainer:
    from mindone.diffusers import DDPMScheduler
    from mindone.diffusers.optimization import get_scheduler
    from mindone.diffusers.training_utils import set_seed

    from t2i.core import runtime
    from t2i.data.store import LatentStore
    from t2i.interop import lora, models
    from t2i.training.optim import build_adamw
    from t2i.training.step import build_ema, build_train_step, mixed_precision

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
    store = LatentStore.open(config.latent_store)
    fingerprint = models.fingerprint(model_dir)
    if store.attrs["model_fingerprint"] != fingerprint:
        raise ValueError(
            f"--latent_store {config.latent_store} was encoded with a different VAE/text encoder than "
            f"{model_dir} (fingerprint {store.attrs['model_fingerprint'][:12]} != {fingerprint[:12]}); "
            "re-run t2i-precompute with this model"
        )
    empty_prompt = store.empty_prompt() if config.caption_dropout_probability else None
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
    max_steps = config.max_train_steps or config.num_train_epochs * batches.steps_per_epoch

    noise_scheduler = DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler")
    base_prediction = noise_scheduler.config.prediction_type
    if config.lora_rank and config.prediction_type not in (None, base_prediction):
        raise ValueError(f"--prediction_type {config.prediction_type} with --lora_rank: a LoRA file carries no "
                         f"scheduler, so it must be trained for the base's {base_prediction}")
    unet = models.load_unet(model_dir, variant=config.variant)
    if unet.config.cross_attention_dim != store.attrs["text_shape"][1]:
        raise ValueError(
            f"UNet cross_attention_dim {unet.config.cross_attention_dim} != store text width {store.attrs['text_shape'][1]}"
        )
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
    param_names = [names[id(p)] for p in params]
    lr = config.learning_rate * (global_batch if config.scale_lr else 1)
    schedule = get_scheduler(config.lr_scheduler, lr=lr, num_warmup_steps=config.lr_warmup_steps,
                             num_training_steps=max_steps)
    optimizer = build_adamw(params, schedule, beta1=config.adam_beta1, beta2=config.adam_beta2,
                            eps=config.adam_epsilon, weight_decay=config.adam_weight_decay, jit=config.jit)
    ema = None
    if config.use_ema:
        ema = build_ema(params, decay=config.ema_decay, model_cls=type(unet), model_config=unet.config)
    step_net, loss_scaler = mixed_precision(unet, models.DTYPES[config.mixed_precision], lora_config is not None)
    train_step = build_train_step(step_net, optimizer, loss_scaler, config.max_grad_norm,
                                  config.gradient_accumulation_steps, config.jit)
    return Trainer(
        config=config, model_dir=model_dir, store=store, unet=unet, optimizer=optimizer, ema=ema, train_step=train_step,
        param_names=param_names, schedule=schedule, train_slots=train_slots, val_slots=val_slots,
        buckets=buckets, batches=batches, compile_log=CompileLog(config.jit), global_batch=global_batch, rank=rank,
        world=world, max_steps=max_steps, scaling_factor=store.scaling_factor,
        alphas_cumprod=noise_scheduler.alphas_cumprod.asnumpy().astype(np.float64),
        num_train_timesteps=noise_scheduler.config.num_train_timesteps,
        prediction_type=config.prediction_type or base_prediction, base_prediction_type=base_prediction,
        empty_prompt=empty_prompt, lora_config=lora_config,
    )


def fit(tr: Trainer, start_step: int, logger: Logger) -> list:
    import mindspore as ms
    from tqdm import tqdm

    cfg = tr.config
    micro = cfg.train_batch_size
    # This worker's positions in every global batch: fixed for the run.
    mine = rank_indices(tr.rank, tr.world, micro, cfg.gradient_accumulation_steps)
    history = []
    main = tr.is_main

    def host_batch(step):
        """This worker's share of the step's inputs, as NumPy: a pure function of (seed, step)."""
        bucket, slots = tr.batches.at(step)
        draws = draw(np.random.default_rng([cfg.seed, step]), tr.global_batch, tr.buckets.latent_shapes[bucket], cfg,
                     tr.num_train_timesteps)
        draws = {k: v[mine] for k, v in draws.items()}
        return bucket, make_batch(tr.buckets.read(bucket, slots[mine]), draws, tr.scaling_factor, tr.alphas_cumprod,
                                  cfg, tr.prediction_type, tr.empty_prompt)

    bar = tqdm(total=tr.max_steps, initial=start_step, desc="train", unit="step", disable=not main)
    batches = one_ahead(host_batch, start_step, tr.max_steps)
    for step in range(start_step, tr.max_steps):
        tick = time.perf_counter()
        bucket, batch = next(batches)
        latent_shape = tr.buckets.latent_shapes[bucket]
        new_shape = tr.compile_log.is_new(latent_shape)
        step_loss = 0.0
        for m in range(cfg.gradient_accumulation_steps):
            part = [ms.Tensor(x[m * micro : (m + 1) * micro]) for x in batch]
            loss, grad_norm, stepped = tr.train_step(*part)
            step_loss += float(loss.asnumpy()) / cfg.gradient_accumulation_steps
        compiled = tr.compile_log.note(tr.buckets.sizes[bucket], latent_shape, time.perf_counter() - tick, main) \
            if new_shape else {}
        if not stepped:
            tr.skipped_steps += 1
        elif tr.ema is not None:
            tr.ema.step(tr.unet.trainable_params())
        lr = float(tr.schedule[min(int(tr.optimizer.global_step.asnumpy().reshape(-1)[0]), len(tr.schedule) - 1)])
        scale = float(tr.train_step.grad_scaler.loss_scaler.scale_value.asnumpy())
        done = step + 1
        record = {"loss": step_loss, "lr": lr, "grad_norm": float(grad_norm.asnumpy()), "loss_scale": scale,
                  "skipped_steps": tr.skipped_steps,
                  "samples_per_s": tr.global_batch / (time.perf_counter() - tick), **compiled}
        if main and cfg.validation_steps and (done % cfg.validation_steps == 0 or done == tr.max_steps):
            record.update(validation_losses(tr))
            if cfg.validation_prompts:
                record["validation_image"] = str(render_validation(tr, done))
        logger.log(done, **{k: v for k, v in record.items() if not isinstance(v, str)})
        history.append({"step": done, **record})
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", sps=f"{record['samples_per_s']:.1f}")
        bar.update(1)
        if main and done % cfg.checkpointing_steps == 0:
            # Data parallel keeps every rank's weights and optimizer state identical: one writer is enough.
            save_checkpoint(tr, done)
    batches.close()
    bar.close()
    return history


def run(config: TrainConfig) -> dict:
    """Train the UNet; returns the per-step history and where the pipeline was written."""
    print(json.dumps(config.public_dict(), indent=2))
    tr = setup(config)
    resume = resolve_resume(config)
    start = load_checkpoint(tr, resume) if resume else 0
    if resume:
        print(f"resumed from {resume} at step {start}")
    out = Path(config.output_dir)
    main = tr.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / CONFIG_NAME, config.public_dict())
    print(f"rank {tr.rank}/{tr.world}: {len(tr.train_slots)} training samples, {len(tr.val_slots)} held out; "
          f"{tr.global_batch} per step; {tr.batches.steps_per_epoch} steps per epoch; "
          f"training steps {start} -> {tr.max_steps}")
    logger = Logger(config, start, enabled=main)
    try:
        history = fit(tr, start, logger)
    finally:
        logger.close()
    if not main:
        return {"history": history, "start_step": start, "final_step": tr.max_steps, "output_dir": out,
                "skipped_steps": tr.skipped_steps}
    # The last step's validation, when it ran, saw these very weights: no need to run it again.
    last = history[-1] if history and history[-1]["step"] == tr.max_steps else {}
    val = {k: last[k] for k in ("val_loss", "val_loss_shuffled")} if "val_loss" in last else validation_losses(tr)
    final_val, final_val_shuffled = val["val_loss"], val["val_loss_shuffled"]
    write_output(tr, history[-1]["loss"] if history else None, final_val)
    print(f"wrote pipeline to {out}; skipped steps {tr.skipped_steps}; "
          f"val loss {final_val} (shuffled captions {final_val_shuffled})")
    if config.push_to_hub:
        # Last: the local output is complete whatever happens to the upload.
        print(f"uploaded to {push_to_hub(out, config.hub_model_id, token=config.hub_token)}")
    return {"history": history, "start_step": start, "final_step": tr.max_steps, "output_dir": out,
            "val_loss": final_val, "val_loss_shuffled": final_val_shuffled, "skipped_steps": tr.skipped_steps,
            "compiles": tr.compile_log.compiles}


@config_file_option
@click.command(context_settings={"show_default": True})
@click.option("--pretrained_model_name_or_path", required=True,
              help="The base diffusers pipeline: a local folder or a Hub model id (fetched into the HF cache).")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub model id.")
@click.option("--variant", default=None, help="Weights variant, e.g. fp16.")
@click.option("--latent_store", required=True,
              help="The zarr store written by t2i-precompute; of aspect buckets, each batch comes from one bucket.")
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
@click.option("--caption_dropout_probability", type=float, default=0.0,
              help="Train this share of samples on the empty prompt, for classifier-free guidance.")
@click.option("--mixed_precision", type=click.Choice(["no", "fp16", "bf16"]), default="no")
@click.option("--use_ema", is_flag=True)
@click.option("--ema_decay", type=float, default=0.9999)
@click.option("--checkpointing_steps", type=int, default=500)
@click.option("--checkpoints_total_limit", type=int, default=None)
@click.option("--resume_from_checkpoint", default=None, help="A checkpoint-N folder, or 'latest'.")
@click.option("--validation_prompts", multiple=True, help="Repeatable; rendered every --validation_steps.")
@click.option("--validation_steps", type=int, default=None)
@click.option("--validation_inference_steps", type=int, default=20)
@click.option("--validation_height", type=int, default=None, help="Validation images' height (default: the store's "
              "--resolution); any multiple of 8, e.g. one of a store's aspect buckets.")
@click.option("--validation_width", type=int, default=None, help="Validation images' width (default: --resolution).")
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
@click.option("--max_buckets", type=int, default=16,
              help="Refuse a --latent_store with more aspect buckets to train: each is one compile of the step.")
@lora_options
@device_option
def cli(**kwargs):
    """Train the UNet of a Stable Diffusion pipeline on a t2i latent store."""
    kwargs["validation_prompts"] = tuple(kwargs["validation_prompts"])
    with cli_errors():
        run(TrainConfig(**kwargs))


if __name__ == "__main__":
    cli()
