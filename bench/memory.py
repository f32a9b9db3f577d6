"""Section 5: peak RSS of `t2i-train` on the demo-sized store vs one 100x larger, and the store reads on each."""

import os
import shutil
import statistics
import subprocess
import sys

from bench import ROOT, SD15_CLIP, SD15_RESOLUTION, SD15_VAE
from bench.stores import bench_store_read, build_random_store, build_scaled_store, dir_bytes
from bench.timing import paired_ratio

RSS_STEPS = 20
RSS_FACTOR = 100
# A batch read takes milliseconds: many repeats make its median steady.
READ_REPEATS = 50
READ_BATCH = 8
# Rows of the random store read at SD-1.5 geometry (246 KB a row: 250 MB), where a row's bytes, not the number of
# zarr calls, decide what a read costs.
SD15_READ_ROWS = 1024


TRAIN_WITH_PEAK_RSS = """
import atexit, runpy, sys
from pathlib import Path
from bench.timing import peak_rss_mb
out = Path(sys.argv.pop(1))
atexit.register(lambda: out.write_text(str(peak_rss_mb())))
runpy.run_module("t2i.train", run_name="__main__")
"""


def train_subprocess(model, store, out, steps, batch, extra=(), warmup=3, validation_samples=4):
    """Run t2i-train (with the flags `extra`) in a child process; returns its own peak RSS, written at its exit, and
    its median step time after the first `warmup` steps."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "T2I_HOME": str(out.parent / "t2i-home")}
    rss_file = out.parent / f"{out.name}.peak_rss_mb"
    rss_file.unlink(missing_ok=True)
    args = [sys.executable, "-c", TRAIN_WITH_PEAK_RSS, str(rss_file), "--pretrained_model_name_or_path", str(model),
            "--latent_store", str(store), "--output_dir", str(out), "--train_batch_size", str(batch),
            "--max_train_steps", str(steps), "--lr_warmup_steps", "0", "--checkpointing_steps", "1000000",
            "--num_validation_samples", str(validation_samples), "--report_to", "none", "--device_target", "CPU",
            *extra]
    with open(out.parent / f"{out.name}.log", "w") as f:
        code = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code != 0:
        raise RuntimeError(f"t2i-train on {store} failed; see {out.parent / f'{out.name}.log'}")
    from t2i.training.runlog import read_log

    lines = read_log(out / "logs")
    step_s = statistics.median(batch / r["samples_per_s"] for r in lines[warmup:])
    return {"peak_rss_mb": float(rss_file.read_text()), "median_step_s": step_s}


def bench_memory(model, small_store, work, repeats):
    big_store = work / "latents-32-x100.zarr"
    build_scaled_store(small_store, big_store, RSS_FACTOR)
    sizes = {"small": small_store, "x100": big_store}
    reads = {name: bench_store_read(path, READ_BATCH, READ_REPEATS) for name, path in sizes.items()}
    sd15_store = work / "latents-sd15-geometry.zarr"
    build_random_store(sd15_store, SD15_READ_ROWS, (2 * SD15_VAE["latent_channels"], SD15_RESOLUTION // 8,
                                                    SD15_RESOLUTION // 8),
                       (SD15_CLIP["max_position_embeddings"], SD15_CLIP["hidden_size"]))
    reads_sd15 = bench_store_read(sd15_store, READ_BATCH, READ_REPEATS)
    shutil.rmtree(sd15_store)
    runs = {k: [] for k in sizes}
    for r in range(repeats):
        for name, path in sizes.items():
            runs[name].append(train_subprocess(model, path, work / f"rss-{name}", RSS_STEPS, 8))
    from t2i.data.store import LatentStore

    out = {}
    for name, path in sizes.items():
        out[name] = {
            "samples": len(LatentStore.open(path).valid_slots()), "store_mb": dir_bytes(path) / 2**20,
            "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in runs[name]),
            "peak_rss_mb_runs": [x["peak_rss_mb"] for x in runs[name]],
            "median_step_s": statistics.median(x["median_step_s"] for x in runs[name]),
            "read_batch": reads[name],
        }
    shutil.rmtree(big_store, ignore_errors=True)
    return {"steps": RSS_STEPS, "batch": 8, "resolution": 32, "runs": repeats, **out,
            "read_batch_sd15_geometry": {"rows": SD15_READ_ROWS, **reads_sd15},
            "ratio peak_rss x100 / small": paired_ratio([x["peak_rss_mb"] for x in runs["x100"]],
                                                        [x["peak_rss_mb"] for x in runs["small"]])}
