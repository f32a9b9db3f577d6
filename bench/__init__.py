"""`make bench`: what one t2i training step costs on this machine, and what caching the latents saves.

Every figure is the median of `--repeats` timed runs after one untimed warm-up. Every ratio is the median of
per-repeat ratios between variants run back to back in the same process, so that drifting load from other jobs on
the machine cancels out of it as far as it can (bench/timing.py). The sections, a module each:

1. data path (train_step.py): the real training step on a latent store (`train.fit` for one step: store read,
   make_batch, mindone TrainStep) vs the same TrainStep on ready tensors vs a bare UNet forward+backward, all on the
   same batch;
2. caching (train_step.py): that step vs a seed-style step, which VAE+CLIP-encodes the same batch's images and
   captions first (`train.fit` again, reading from an object that encodes instead of the store);
3. precompute (precompute.py): `t2i.precompute.run` on a fresh store vs a bare VAE+CLIP forward over the same batches;
4. peer: the same UNet train step (forward, backward, clipping, AdamW) and a 10-step DDIM pipeline call in PyTorch
   diffusers (peer.py, run by `--peer` in .venv-peer, so it and what it imports never import MindSpore), against
   MindSpore's pipeline call (pipeline.py);
5. memory (memory.py): peak RSS of `t2i-train` on the demo-sized store vs one 100x larger, and on each store the time
   `LatentStore.read` takes for a batch of random rows (train's per-epoch permutation) vs a batch of consecutive rows
   (stores.py);
6. LoRA (lora.py): step time and peak RSS of `t2i-train --lora_rank` against plain `t2i-train`;
7. loop (loop.py): `t2i-train` end to end (its log's step time) against the bare compiled step it runs and a plain
   PyTorch diffusers loop on the same UNet and shapes, for two tiny geometries.
`--sd15` instead times the SD-1.5 geometry (random weights, batch 1: UNet, VAE at 512 px, CLIP-L; the train step and
`t2i-train`'s loop) in subprocesses of their own (sd15.py), and PyTorch's in .venv-peer, into bench/results-sd15.*.
__main__.py is the command line and the order of the sections, report.py the tables, machine.py what the results say
about the machine.

This module holds what several sections share: paths and the geometries they measure.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench"
WORK = OUT / "work.tmp"
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
NUM_IMAGES = 96
# (image resolution, batch size) of the tiny model: 16x16 and 32x32 latents.
TINY_CONFIGS = ((32, 2), (32, 8), (64, 2), (64, 8))
PIPELINE_RESOLUTIONS = (32, 64)
# The loop section: t2i-train at 32 px (16x16 latents), batch 8; the tiny model's UNet, and one with 16 norm groups
# (UNet config overrides), the geometry a user measured the loop on.
LOOP_GEOMETRIES = {"t2i": {}, "groups16": {"norm_num_groups": 16}}
LOOP_BATCH = 8
LOOP_STEPS = 40
LOOP_RESOLUTION = 32
DDIM_STEPS = 10
PROMPT = "a red circle"
# SD-1.5's UNet: diffusers' default block types, norm groups and channels in/out are SD-1.5's.
SD15_UNET = {"sample_size": 64, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
             "cross_attention_dim": 768, "attention_head_dim": 8}
SD15_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2, "latent_channels": 4, "sample_size": 512}
SD15_CLIP = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "projection_dim": 768}
SD15_RESOLUTION = 512
# The random-weight SD-1.5 folder (sd15_model.py), built once and shared by `--sd15` and `make smoke-sd15`.
SD15_MODEL = WORK / "sd15-model"
# `--sd15`'s loop row: t2i-train as the smoke runs it (batch 1, op by op with checkpointing) for 3 steps on 2 images at
# 512 px; the median of the steps after the first, whose ops run for the first time.
SD15_LOOP_STEPS, SD15_LOOP_WARMUP, SD15_LOOP_IMAGES = 3, 1, 2
