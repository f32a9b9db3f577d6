"""`make demo`: tiny model + synthetic data -> precompute -> train -> infer, on CPU in a few minutes, then what the
model learned: `demo/grid.png` (samples of the base and of the trained model for every class prompt), `demo/loss.png`
and `demo/learning.json` (t2i.demo.learning's measures on those same samples, trained vs base vs chance).

The demo's settings are written here once: `python -m t2i.demo --print-args STAGE` prints them as the flags of that
stage's command, which is where the Makefile's `make precompute`, `make train`, ... take them from.
"""

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from t2i.demo.tiny_vae import VaeRecipe
from t2i.training.runlog import read_log

DEMO = Path("demo")
VALIDATION_PROMPTS = ("a red circle", "a green triangle", "a blue square")


@dataclass(frozen=True)
class DemoSettings:
    root: Path = DEMO
    num_images: int = 96
    resolution: int = 32  # 16x16 latents: the tiny UNet learns the demo classes in a few hundred CPU steps
    steps: int = 300
    batch_size: int = 8
    # Against 1e-3, on 96 samples after 300 steps: colour 69 -> 73%, latent nearest its class mean 23 -> 29%.
    learning_rate: float = 3e-3
    vae_train_steps: int = VaeRecipe.steps
    samples_per_prompt: int = 4
    sample_scheduler: str = "dpm++"  # as train's validation samples: good pictures in few steps
    sample_steps: int = 10
    guidance_scale: float = 4.0
    device_target: str | None = None

    @property
    def model(self):
        return self.root / "tiny-model"

    @property
    def data(self):
        return self.root / "data"

    @property
    def store(self):
        return self.root / "latents.zarr"

    @property
    def output(self):
        return self.root / "output"


def stage_flags(s: DemoSettings) -> dict:
    """stage -> the demo's settings for it, as {flag name: value}; paths and the device are passed apart."""
    return {
        "tiny-model": {"resolution": s.resolution, "vae_train_steps": s.vae_train_steps},
        "data": {"num_images": s.num_images},
        "precompute": {"resolution": s.resolution, "center_crop": True, "random_flip": True},
        "train": {"train_batch_size": s.batch_size, "max_train_steps": s.steps, "learning_rate": s.learning_rate,
                  "lr_scheduler": "constant", "lr_warmup_steps": 0, "snr_gamma": 5.0,
                  "checkpointing_steps": s.steps // 2, "checkpoints_total_limit": 1,
                  "validation_steps": max(s.steps // 3, 1), "validation_prompts": VALIDATION_PROMPTS,
                  "validation_inference_steps": s.sample_steps, "num_validation_samples": 12,
                  "resume_from_checkpoint": "latest"},
    }


def command_line(flags: dict) -> str:
    """Flags as shell words: True -> --flag (the demo sets no off-flags), a tuple -> the flag repeated."""
    words = []
    for name, value in flags.items():
        if value is True:
            words.append(f"--{name}")
        else:
            for item in value if isinstance(value, tuple) else (value,):
                words += [f"--{name}", str(item)]
    return shlex.join(words)


def precompute_config(s: DemoSettings):
    from t2i.precompute import PrecomputeConfig

    return PrecomputeConfig(pretrained_model_name_or_path=str(s.model), train_data_dir=str(s.data),
                            output_dir=str(s.store), device_target=s.device_target, **stage_flags(s)["precompute"])


def train_config(s: DemoSettings, **overrides):
    from t2i.train import TrainConfig

    return TrainConfig(**{"pretrained_model_name_or_path": str(s.model), "latent_store": str(s.store),
                          "output_dir": str(s.output), "device_target": s.device_target,
                          **stage_flags(s)["train"], **overrides})


def learning_check(s: DemoSettings) -> dict:
    """Sample every class prompt from the base and the trained model, draw them side by side into grid.png, and
    measure them (t2i.demo.learning): the report written to learning.json."""
    from t2i.demo.learning import (
        class_means,
        decode,
        latent_chance,
        latent_measures,
        pixel_chance,
        pixel_measures,
        sample_latents,
    )
    from t2i.demo.plots import sample_grid
    from t2i.demo.shapes import caption, demo_classes

    names = [caption(c, shape) for c, shape in demo_classes()]
    prompts = [name for name in names for _ in range(s.samples_per_prompt)]
    means = class_means(s.store, s.data)
    report = {"classes": len(names), "samples_per_prompt": s.samples_per_prompt, "samples": len(prompts),
              "sample_scheduler": s.sample_scheduler, "sample_steps": s.sample_steps,
              "guidance_scale": s.guidance_scale,
              "pixel": {"chance": pixel_chance()}, "latent": {"chance": latent_chance(len(names))}}
    panels = {}
    for label, model, title in (("base", s.model, "base model"), ("trained", s.output, f"trained {s.steps} steps")):
        latents = sample_latents(model, names, s.samples_per_prompt, s.root / "samples" / label, s.resolution,
                                 s.sample_steps, s.guidance_scale, s.sample_scheduler, s.device_target)
        images = decode(model, latents)
        report["pixel"][label] = pixel_measures(images, prompts)
        report["latent"][label] = latent_measures(latents, prompts, means)
        panels[title] = images.reshape(len(names), s.samples_per_prompt, *images.shape[1:])
    sample_grid(panels, names, s.root / "grid.png",
                title=f"t2i demo: {s.samples_per_prompt} samples per prompt, seed 0, "
                      f"{s.sample_steps} {s.sample_scheduler} steps")
    return report


def main(s: DemoSettings = DemoSettings()):
    from t2i import precompute, train
    from t2i.core import runtime
    from t2i.demo.plots import loss_plot
    from t2i.demo.shapes import make_demo_data
    from t2i.demo.tiny import TinyGeometry, build_tiny_model
    from t2i.infer import InferConfig
    from t2i.infer import run as infer

    runtime.setup(s.device_target)
    times = {}
    start = time.perf_counter()
    if not (s.model / "model_index.json").is_file():
        build_tiny_model(s.model, TinyGeometry(sample_size=s.resolution), vae_recipe=VaeRecipe(steps=s.vae_train_steps))
    if not (s.data / "metadata.jsonl").is_file():
        make_demo_data(s.data, s.num_images, size=64)
    times["build tiny model + data"] = time.perf_counter() - start
    start = time.perf_counter()
    precompute.run(precompute_config(s))
    times["precompute"] = time.perf_counter() - start
    start = time.perf_counter()
    result = train.run(train_config(s))
    times["train"] = time.perf_counter() - start
    start = time.perf_counter()
    infer(InferConfig(prompt=("yoda",), model=str(s.output), output=str(s.root / "yoda.png"), overwrite=True,
                      height=s.resolution, width=s.resolution, device_target=s.device_target))
    times["infer"] = time.perf_counter() - start
    start = time.perf_counter()
    report = learning_check(s)
    report.update(val_loss=result["val_loss"], val_loss_shuffled=result["val_loss_shuffled"])
    (s.root / "learning.json").write_text(json.dumps(report, indent=2))
    history = read_log(s.output / "logs")
    loss_plot(history, s.root / "loss.png", title=f"t2i demo: tiny UNet, {s.steps} steps of {s.batch_size}")
    times["learning check + plots"] = time.perf_counter() - start
    vae = json.loads((s.model / "t2i_tiny.json").read_text())["vae_training"]
    print("\nt2i demo")
    for stage, seconds in times.items():
        print(f"  {stage:<24} {seconds:7.1f} s")
    print(f"  image           {s.root / 'yoda.png'}")
    print(f"  samples         {s.root / 'grid.png'} (base model | trained model, a row per class prompt)")
    print(f"  loss plot       {s.root / 'loss.png'}")
    if vae:
        print(f"  VAE: {vae['recipe']['steps']} steps in {vae['seconds']} s, reconstruction MSE "
              f"{vae['reconstruction_mse']} (a blank image: {vae['blank_image_mse']})")
    pixel, latent = report["pixel"], report["latent"]
    print(f"  learning, {report['samples']} samples ({report['samples_per_prompt']} per class prompt), "
          "trained / base / chance:")
    for key, what in (("colour", "drawn in the prompt's colour"), ("shape", "drawn in the prompt's shape")):
        print(f"    {what:<42} {pixel['trained'][key]:4.0%} / {pixel['base'][key]:4.0%} / {pixel['chance'][key]:4.0%}")
    for key, what in (("nearest_class_mean", "latent nearest its class mean"),
                      ("pooled_nearest_colour", "latent statistics nearest its colour's")):
        print(f"    {what:<42} {latent['trained'][key]:4.0%} / {latent['base'][key]:4.0%} / "
              f"{latent['chance'][key]:4.0%}")
    print(f"  held-out loss {report['val_loss']:.4f} with the right captions vs {report['val_loss_shuffled']:.4f} "
          "with shuffled captions")
    return report


@click.command()
@click.option("--print-args", "stage", type=click.Choice(list(stage_flags(DemoSettings()))), default=None,
              help="Print the demo's flags for this stage's command (the Makefile's source) and exit.")
def cli(stage):
    """Run the whole demo into ./demo."""
    if stage is not None:
        click.echo(command_line(stage_flags(DemoSettings())[stage]))
        return
    main()
    # MindSpore's jit caches keep the stages' compiled cells alive until interpreter teardown, where each Cell.__del__
    # then fails on a cleared module (107 tracebacks after the summary); everything is written, so skip the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

