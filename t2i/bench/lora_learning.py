"""Does a LoRA learn what the full run learns? The demo's model, data and store (as `make demo` builds them), a LoRA run
with the demo's training settings (learning rate x10, as LoRA is usually trained against a full fine-tune) into
ROOT/lora, fused into its base (t2i-export --merge_lora) and measured by the demo's own learning check
(t2i.demo.learning_check: the same 48 samples per model, seed 0, in pixel and latent space, against the base and
chance), with its held-out loss with right vs shuffled captions; then the base + adapter at scale 0 sampled as the base
was, its latents against the base's. With --full, first the whole demo (t2i.demo.main: the full UNet's run and its
learning check) into ROOT/full, on whose model, data and store the LoRA then trains, for a comparison within one run.
`python -m t2i.bench.lora_learning [--full] [ROOT]` prints the table bench/README.md keeps.

Not a test: training and sampling take many minutes on 2 cores (tests/test_lora.py checks the cheap part)."""

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

LORA_RANK = 8
LORA_LR_FACTOR = 10


def lora_run(full, root: Path) -> dict:
    """The LoRA run on the demo `full`'s model, data and store (symlinked into root), measured as the full run is."""
    from t2i import demo, export, train

    s = replace(full, root=root)
    root.mkdir(parents=True, exist_ok=True)
    for part in ("model", "data", "store"):
        link = getattr(s, part)
        if not link.exists():
            link.symlink_to(getattr(full, part).resolve())
    adapter = root / "adapter"
    tick = time.perf_counter()
    result = train.run(demo.train_config(s, output_dir=str(adapter), lora_rank=LORA_RANK,
                                         learning_rate=full.learning_rate * LORA_LR_FACTOR))
    train_s = time.perf_counter() - tick
    export.run(export.ExportConfig(model=str(adapter), output=str(s.output), format="merged", overwrite=True))
    report = demo.learning_check(s)
    report.update(val_loss=result["val_loss"], val_loss_shuffled=result["val_loss_shuffled"], train_s=train_s,
                  lora_rank=LORA_RANK, learning_rate=full.learning_rate * LORA_LR_FACTOR,
                  scale_0=scale_0_against_base(s, adapter))
    (root / "learning.json").write_text(json.dumps(report, indent=2))
    return report


def scale_0_against_base(s, adapter) -> dict:
    """The base + adapter at scale 0, sampled with the learning check's settings, against its base samples."""
    from t2i.infer import InferConfig, run
    from t2i.tiny import caption, demo_classes

    names = [caption(c, shape) for c, shape in demo_classes()]
    paths = run(InferConfig(prompt=tuple(names), model=str(s.model), lora=(f"{adapter}:0",),
                            output=str(s.root / "samples" / "scale-0"), output_type="latent",
                            num_images_per_prompt=s.samples_per_prompt, height=s.resolution, width=s.resolution,
                            num_inference_steps=s.sample_steps, guidance_scale=s.guidance_scale, seed=0,
                            overwrite=True, jit=True, device_target=s.device_target))
    base = s.root / "samples" / "base"
    diffs = [float(np.abs(np.load(p) - np.load(base / p.name)).max()) for p in paths]
    return {"samples": len(paths), "identical": sum(d == 0 for d in diffs), "max_abs_diff": max(diffs)}


def table(lora: dict, full: dict | None) -> str:
    """LoRA | full UNet (with --full) | base | chance; base and chance are the LoRA report's own."""
    rows = [("sampled images drawn in the prompt's colour", "pixel", "colour"),
            ("sampled images drawn in the prompt's shape", "pixel", "shape"),
            ("sampled latents nearest their own class's mean training latent", "latent", "nearest_class_mean"),
            ("same, nearest by pooled per-channel statistics: right colour", "latent", "pooled_nearest_colour")]
    lines = ["| measure | LoRA | full UNet | base model | chance |", "|---|---|---|---|---|"]
    for label, space, key in rows:
        other = f"{full[space]['trained'][key]:.0%}" if full else "-"
        lines.append(f"| {label} | {lora[space]['trained'][key]:.0%} | {other} | {lora[space]['base'][key]:.0%} | "
                     f"{lora[space]['chance'][key]:.0%} |")
    other = f"{full['val_loss']:.4f} / {full['val_loss_shuffled']:.4f}" if full else "-"
    lines.append(f"| held-out loss, right captions / shuffled captions | {lora['val_loss']:.4f} / "
                 f"{lora['val_loss_shuffled']:.4f} | {other} | | |")
    return "\n".join(lines)


def build(s):
    """The demo's model, data and store, made as t2i.demo.main makes them."""
    from t2i import precompute, runtime
    from t2i.demo import precompute_config
    from t2i.tiny import TinyGeometry, build_tiny_model, make_demo_data
    from t2i.tiny_vae import VaeRecipe

    runtime.setup(s.device_target)
    build_tiny_model(s.model, TinyGeometry(sample_size=s.resolution), vae_recipe=VaeRecipe(steps=s.vae_train_steps))
    make_demo_data(s.data, s.num_images, size=64)
    precompute.run(precompute_config(s))


def main(argv):
    import os

    from t2i import demo

    with_full = "--full" in argv
    args = [a for a in argv if a != "--full"]
    root = Path(args[0] if args else "bench/work.tmp/lora-learning").resolve()
    os.environ["T2I_HOME"] = str(root / "t2i-home")  # the user's last-model record stays theirs
    full = demo.DemoSettings(root=root / "full")
    start = time.strftime("%Y-%m-%d %H:%M:%S")
    load = [os.getloadavg()[0]]
    tick = time.perf_counter()
    full_report = demo.main(full) if with_full else build(full)
    load.append(os.getloadavg()[0])
    lora = lora_run(full, root / "lora")
    load.append(os.getloadavg()[0])
    print(f"\nLoRA on the demo, started {start}, {time.perf_counter() - tick:.0f} s, 1-min load average "
          f"{' -> '.join(f'{x:.1f}' for x in load)}; LoRA rank {LORA_RANK}, learning rate {lora['learning_rate']}, "
          f"trained in {lora['train_s']:.0f} s")
    print(table(lora, full_report))
    print(f"scale 0: {lora['scale_0']}")


if __name__ == "__main__":
    main(sys.argv[1:])
