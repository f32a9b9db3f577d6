"""Section 7: `t2i-train` end to end as a user runs it, against the bare compiled step it runs and a plain PyTorch
diffusers loop, for two tiny geometries: t2i's own and the one a user measured t2i's loop at 2.25x PyTorch's on
(UNet blocks (32, 64), one layer per block, 16 norm groups; the VAE, text encoder and store are t2i's tiny model's).

- loop: `t2i-train` in a process of its own (memory.train_subprocess), validation and checkpoints off; the median
  step time from its log (`samples_per_s`, which covers the whole iteration: batch, step, the scalars logged)
  after warm-up;
- bare step: the same TrainStep cell, compiled, called again and again on the tensors of one of the loop's batches;
- PyTorch loop (peer.peer_loop, in .venv-peer): forward, MSE, backward, clip, AdamW and `loss.item()` on cached
  latents held in memory, with fresh noise and timesteps each step, as a hand-written diffusers loop does.
"""

import shutil
import statistics

from bench import LOOP_BATCH, LOOP_GEOMETRIES, LOOP_STEPS
from bench.loop_models import loop_model_dirs
from bench.memory import train_subprocess
from bench.timing import interleaved, loadavg, quiet


def bare_step_s(model, store, out, batch, repeats):
    """Median time of the compiled TrainStep t2i-train builds, on the tensors of its first batch."""
    from bench.train_step import Recorder, step_on_tensors
    from t2i import train
    from t2i.training.runlog import Logger

    shutil.rmtree(out, ignore_errors=True)
    cfg = train.TrainConfig(pretrained_model_name_or_path=str(model), latent_store=str(store), output_dir=str(out),
                            train_batch_size=batch, max_train_steps=10**4, lr_warmup_steps=0, checkpointing_steps=10**6,
                            num_validation_samples=0, report_to="none", device_target="CPU")
    with quiet():
        r = train.setup(cfg)
        # One step of a long schedule: the optimizer looks up its learning rate by step, for every step timed here.
        r.state.train_step = recorder = Recorder(r.state.train_step)
        train.fit(cfg, r, 0, 1, Logger(cfg.log_dir, 0, enabled=False))  # compiles, and records the first batch's tensors

    step = interleaved({"step": lambda r: step_on_tensors(recorder.step, recorder.inputs)}, repeats, warmup=2)
    return statistics.median(step["step"])


def bench_loop(work, store, repeats):
    """Per geometry: the loop's median step, the bare step's, and their ratio (PyTorch's loop: attach_peer)."""
    rows = []
    for name, model in loop_model_dirs(work).items():
        loop = train_subprocess(model, store, work / f"loop-{name}", LOOP_STEPS, LOOP_BATCH)
        bare = bare_step_s(model, store, work / f"loop-bare-{name}", LOOP_BATCH, repeats * 4)
        rows.append({"geometry": name, "unet": LOOP_GEOMETRIES[name], "batch": LOOP_BATCH, "steps": LOOP_STEPS,
                     "loop_step_s": loop["median_step_s"], "loop_peak_rss_mb": loop["peak_rss_mb"],
                     "bare_step_s": bare, "ratio loop / bare": loop["median_step_s"] / bare, "load": loadavg()})
    return rows
