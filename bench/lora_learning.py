"""Does a LoRA learn what the full run learns? On a pretrained base, as LoRA is used.

The demo's model, data and store (as `make demo` builds them) into ROOT/full. The base: the demo's UNet trained in full
with the demo's settings but almost every caption dropped (--caption_dropout_probability 0.99: the store's empty-prompt
states instead), so that it learns to draw demo images, not the prompts, into ROOT/base. A LoRA run on that base's
output folder with the real captions and the demo's settings (its own rank and learning rate) into ROOT/lora, fused
into the base (t2i-export --merge_lora) and measured by the demo's own learning check (t2i.demo.learning_check: the
same 48 samples per model, seed 0, in pixel and latent space, against its base -- the pretrained one -- and chance),
with the share of background pixels in the samples (demo-like images, whatever their colour) and its held-out loss
with right vs shuffled captions; then the base + adapter at scale 0 sampled as the base was, its latents against the
base's. With --full, first the whole demo (t2i.demo.main: the full UNet's run from the random base and its learning
check) into ROOT/full, for a comparison within one run. With --random-base the LoRA trains on the demo's random UNet
instead (into ROOT/lora-random-base), the earlier experiment that showed the base must be pretrained.
`python -m bench.lora_learning [--full] [--random-base] [ROOT]` prints the table bench/README.md keeps.

Not a test: training and sampling take many minutes on 2 cores (tests/test_lora.py checks the cheap part)."""

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

# Rank 8 on the same base learned the prompt's colour (54% against 25%) but not its shape (31% against 33%); rank 16
# learned both (bench/README.md).
LORA_RANK = 16
LORA_LEARNING_RATE = 1e-2
# < 1, as the flag requires: ~24 of the base's 2400 training samples keep their caption, too few to learn 12 classes.
BASE_CAPTION_DROPOUT = 0.99


def linked(full, root: Path, model: Path | None = None):
    """The demo settings `full` moved to root, its model (or `model`), data and store symlinked there."""
    s = replace(full, root=root)
    root.mkdir(parents=True, exist_ok=True)
    for part, target in (("model", model or full.model), ("data", full.data), ("store", full.store)):
        link = getattr(s, part)
        if not link.exists():
            link.symlink_to(Path(target).resolve())
    return s


def pretrain(full, root: Path) -> dict:
    """The demo's UNet trained in full, unconditionally, into root/output: the LoRA's base. A base already trained
    there is reused with its report, so that LoRA settings can be tried on one base."""
    from t2i import train
    from t2i.demo import run as demo

    done = root / "pretrain.json"
    if done.is_file():
        return json.loads(done.read_text())
    s = linked(full, root)
    tick = time.perf_counter()
    result = train.run(demo.train_config(s, caption_dropout_probability=BASE_CAPTION_DROPOUT))
    report = {"model": str(s.output), "caption_dropout_probability": BASE_CAPTION_DROPOUT,
              "val_loss": result["val_loss"], "val_loss_shuffled": result["val_loss_shuffled"],
              "train_s": time.perf_counter() - tick}
    done.write_text(json.dumps(report, indent=2))
    return report


def lora_run(full, base_model: Path, root: Path) -> dict:
    """The LoRA run on `base_model` with the demo `full`'s data and store, measured as the full run is."""
    from t2i import export, train
    from t2i.demo import run as demo

    s = linked(full, root, base_model)
    adapter = root / "adapter"
    tick = time.perf_counter()
    result = train.run(demo.train_config(s, output_dir=str(adapter), lora_rank=LORA_RANK,
                                         learning_rate=LORA_LEARNING_RATE))
    train_s = time.perf_counter() - tick
    export.run(export.ExportConfig(model=str(adapter), output=str(s.output), format="merged", overwrite=True))
    report = demo.learning_check(s)
    report.update(val_loss=result["val_loss"], val_loss_shuffled=result["val_loss_shuffled"], train_s=train_s,
                  lora_rank=LORA_RANK, learning_rate=LORA_LEARNING_RATE, base_model=str(base_model),
                  background={"base": sampled_background(s.model, root / "samples" / "base"),
                              "trained": sampled_background(s.output, root / "samples" / "trained"),
                              "data": data_background(s)},
                  scale_0=scale_0_against_base(s, adapter))
    (root / "learning.json").write_text(json.dumps(report, indent=2))
    return report


def background_share(images) -> float:
    """Mean share of background pixels (t2i.demo.learning's foreground rule) in RGB uint8 images: ~0.6 on the demo images,
    whose one shape lies on a plain background; a random UNet's samples, coloured blobs everywhere, score ~0.3 and
    still get a colour and a shape from t2i.demo.learning.classify."""
    from t2i.demo.learning import foreground

    return float(1.0 - foreground(images).mean())


def sampled_background(model, latent_dir: Path) -> float:
    """background_share of the decoded latents in latent_dir (those the learning check sampled from `model`)."""
    from t2i.demo.learning import decode

    return background_share(decode(model, np.stack([np.load(p) for p in sorted(latent_dir.glob("*.npy"))])))


def data_background(s) -> float:
    """background_share of the demo images at the sampling resolution."""
    from PIL import Image

    return background_share([np.asarray(Image.open(p).convert("RGB").resize((s.resolution, s.resolution)))
                             for p in sorted(s.data.glob("*.png"))])


def scale_0_against_base(s, adapter) -> dict:
    """The base + adapter at scale 0, sampled with the learning check's settings, against its base samples."""
    from t2i.demo.shapes import caption, demo_classes
    from t2i.infer import InferConfig, run

    names = [caption(c, shape) for c, shape in demo_classes()]
    paths = run(InferConfig(prompt=tuple(names), model=str(s.model), lora=(f"{adapter}:0",),
                            output=str(s.root / "samples" / "scale-0"), output_type="latent",
                            num_images_per_prompt=s.samples_per_prompt, height=s.resolution, width=s.resolution,
                            num_inference_steps=s.sample_steps, guidance_scale=s.guidance_scale,
                            scheduler=s.sample_scheduler, seed=0, overwrite=True, jit=True,
                            device_target=s.device_target))
    base = s.root / "samples" / "base"
    diffs = [float(np.abs(np.load(p) - np.load(base / p.name)).max()) for p in paths]
    return {"samples": len(paths), "identical": sum(d == 0 for d in diffs), "max_abs_diff": max(diffs)}


def table(lora: dict, base: dict | None, full: dict | None) -> str:
    """LoRA | its base | chance | full UNet (with --full); the base's and chance's measures are the LoRA report's."""
    rows = [("sampled images drawn in the prompt's colour", "pixel", "colour"),
            ("sampled images drawn in the prompt's shape", "pixel", "shape"),
            ("sampled latents nearest their own class's mean training latent", "latent", "nearest_class_mean"),
            ("same, nearest by pooled per-channel statistics: right colour", "latent", "pooled_nearest_colour")]
    lines = ["| measure | LoRA | its base | chance | full UNet from the random base |", "|---|---|---|---|---|"]
    for label, space, key in rows:
        other = f"{full[space]['trained'][key]:.0%}" if full else "-"
        lines.append(f"| {label} | {lora[space]['trained'][key]:.0%} | {lora[space]['base'][key]:.0%} | "
                     f"{lora[space]['chance'][key]:.0%} | {other} |")
    other = f"{sampled_background(full['model'], full['samples'] / 'trained'):.0%}" if full else "-"
    lines.append(f"| background pixels in the sampled images (demo images: {lora['background']['data']:.0%}) | "
                 f"{lora['background']['trained']:.0%} | {lora['background']['base']:.0%} | | {other} |")
    lines.append(f"| held-out loss, right captions / shuffled captions | {losses(lora)} | {losses(base)} | | "
                 f"{losses(full)} |")
    return "\n".join(lines)


def losses(report: dict | None) -> str:
    return f"{report['val_loss']:.4f} / {report['val_loss_shuffled']:.4f}" if report else "-"


def build(s):
    """The demo's model, data and store, made as t2i.demo.main makes them."""
    from t2i import precompute
    from t2i.core import runtime
    from t2i.demo.run import precompute_config
    from t2i.demo.shapes import make_demo_data
    from t2i.demo.tiny import TinyGeometry, build_tiny_model
    from t2i.demo.tiny_vae import VaeRecipe

    runtime.setup(s.device_target)
    build_tiny_model(s.model, TinyGeometry(sample_size=s.resolution), vae_recipe=VaeRecipe(steps=s.vae_train_steps))
    make_demo_data(s.data, s.num_images, size=64)
    precompute.run(precompute_config(s))


def main(argv):
    import os

    from t2i.demo import run as demo

    with_full, random_base = "--full" in argv, "--random-base" in argv
    args = [a for a in argv if a not in ("--full", "--random-base")]
    root = Path(args[0] if args else "bench/work.tmp/lora-learning").resolve()
    os.environ["T2I_HOME"] = str(root / "t2i-home")  # the user's last-model record stays theirs
    full = demo.DemoSettings(root=root / "full")
    start = time.strftime("%Y-%m-%d %H:%M:%S")
    load = [os.getloadavg()[0]]
    tick = time.perf_counter()
    full_report = demo.main(full) if with_full else build(full)
    if full_report:
        full_report.update(model=full.output, samples=full.root / "samples")
    load.append(os.getloadavg()[0])
    base = None if random_base else pretrain(full, root / "base")
    load.append(os.getloadavg()[0])
    # Apart from ROOT/lora: a run resumes its folder's last checkpoint, which must be of the same base and rank.
    lora = lora_run(full, full.model if random_base else Path(base["model"]),
                    root / ("lora-random-base" if random_base else "lora"))
    load.append(os.getloadavg()[0])
    print(f"\nLoRA on the demo, started {start}, {time.perf_counter() - tick:.0f} s, 1-min load average "
          f"{' -> '.join(f'{x:.1f}' for x in load)}; base: "
          + ("the demo's random UNet" if random_base else
             f"the demo's UNet trained with caption dropout {BASE_CAPTION_DROPOUT} in {base['train_s']:.0f} s")
          + f"; LoRA rank {LORA_RANK}, learning rate {LORA_LEARNING_RATE}, trained in {lora['train_s']:.0f} s")
    print(table(lora, base, full_report))
    print(f"scale 0: {lora['scale_0']}")


if __name__ == "__main__":
    main(sys.argv[1:])
