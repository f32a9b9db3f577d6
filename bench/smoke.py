"""`make smoke-sd15`: the SD-1.5 geometry end to end through the real commands, each stage's time and peak RSS.

precompute 4 images at 512 px -> train 3 steps at batch 1 with --gradient_checkpointing, checkpointing at step 2,
killed with SIGKILL once checkpoint-2 is on disk and resumed to step 3 -> t2i-export single file -> t2i-infer 2 steps
at 512 px. The model is bench/sd15_model.py's random-weight folder in SD-1.5's layout, built once into bench/work.tmp.
Training runs op by op (--no_jit): on MindSpore's CPU backend the compiled SD-1.5 step with checkpointing peaked at
17.3 GB in its forward+backward alone (op by op: 10.7 GB), too much beside the optimizer's 6.9 GB of moments.
Precompute encodes one image at a time: on CPU the VAE's 512 px activations at --batch_size 8 passed 17 GB.
Writes bench/smoke-sd15.json and .md."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import OUT, SD15_MODEL, SD15_RESOLUTION, WORK
from bench.sd15_model import ensure_sd15_model
from bench.timing import loadavg, log
from t2i.training.runlog import read_log

BIN = Path(sys.executable).parent
STEPS, KILL_AFTER = 3, 2
# How SD-1.5 trains here (and `--sd15`'s loop row): op by op with checkpointing.
TRAIN_FLAGS = ("--gradient_checkpointing", "--no_jit")
TRAIN_ARGS = ["--train_batch_size", "1", *TRAIN_FLAGS, "--num_validation_samples", "0",
              "--checkpointing_steps", str(KILL_AFTER), "--report_to", "none", "--lr_warmup_steps", "0",
              "--max_train_steps", str(STEPS), "--resume_from_checkpoint", "latest"]


def run_stage(name, args, log_path, stop_when=None):
    """Run a t2i command as a child; (seconds, peak RSS in GB of that child, exit status). stop_when: a predicate
    polled every second; once true the child is killed with SIGKILL, as a crash or OOM kill would end it."""
    start = time.perf_counter()
    with open(log_path, "w") as f:
        child = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=f, stderr=subprocess.STDOUT)
        killed = False
        while True:  # wait4, not poll: poll would reap the child and lose its rusage
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if stop_when and not killed and stop_when():
                child.send_signal(signal.SIGKILL)
                killed = True
            time.sleep(1)
    seconds = time.perf_counter() - start
    code = child.returncode = os.waitstatus_to_exitcode(status)
    if code != 0 and not killed:
        raise SystemExit(f"smoke-sd15: {name} failed with exit {code}; see {log_path}")
    log(f"{name}: {seconds:.0f} s, peak RSS {usage.ru_maxrss / 2**20:.1f} GB" + (" (killed)" if killed else ""))
    return {"stage": name, "seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
            "killed": killed}


def main():
    work = WORK / "smoke-sd15"
    model, data, store, out = SD15_MODEL, work / "data", work / "latents.zarr", work / "output"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result = {"measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": loadavg(), "stages": []}
    stages = result["stages"]
    if not (model / "model_index.json").is_file():
        log(f"building the random-weight SD-1.5 folder in {model}")
        result["model_build_s"] = round(ensure_sd15_model(model), 1)
    model_args = ["--pretrained_model_name_or_path", str(model)]
    stages.append(run_stage("demo data", ["t2i-demo-data", "--output_dir", str(data), "--num_images", "4",
                                          "--resolution", str(SD15_RESOLUTION)], work / "data.log"))
    stages.append(run_stage("precompute", ["t2i-precompute", *model_args, "--train_data_dir", str(data),
                                           "--output_dir", str(store), "--resolution", str(SD15_RESOLUTION),
                                           "--center_crop", "--batch_size", "1"], work / "precompute.log"))
    train = ["t2i-train", *model_args, "--latent_store", str(store), "--output_dir", str(out), *TRAIN_ARGS]
    checkpoint = out / f"checkpoint-{KILL_AFTER}"
    stages.append(run_stage(f"train to step {KILL_AFTER}, killed", train, work / "train.log", checkpoint.is_dir))
    stages.append(run_stage(f"train resumed to step {STEPS}", train, work / "train-resumed.log"))
    resumed = (work / "train-resumed.log").read_text()
    if f"checkpoint-{KILL_AFTER}" not in resumed:
        raise SystemExit(f"smoke-sd15: the second run did not resume from {checkpoint}; see {work / 'train-resumed.log'}")
    single = work / "sd15-finetuned.safetensors"
    stages.append(run_stage("export single file", ["t2i-export", "--model", str(out), "--output", str(single)],
                            work / "export.log"))
    image = work / "yoda.png"
    stages.append(run_stage("infer 2 steps", ["t2i-infer", "--prompt", "yoda", "--model", str(out),
                                              "--num_inference_steps", "2", "--height", str(SD15_RESOLUTION),
                                              "--width", str(SD15_RESOLUTION), "--output", str(image)],
                            work / "infer.log"))
    # Batch 1: a step's seconds are 1 / samples_per_s. Steps 1 and 3 are each the first of their process.
    logged = read_log(out / "logs")
    result["train_step_s"] = {r["step"]: round(1 / r["samples_per_s"], 1) for r in logged}
    result["single_file_gb"] = round(single.stat().st_size / 2**30, 2)
    result["image"] = image.is_file()
    result["load_end"] = loadavg()
    (OUT / "smoke-sd15.json").write_text(json.dumps(result, indent=2))
    rows = "\n".join(f"| {s['stage']} | {s['seconds']:.0f} | {s['peak_rss_gb']:.1f} |" for s in stages)
    (OUT / "smoke-sd15.md").write_text(
        f"# make smoke-sd15, {result['measured_at']}\n\nLoad average {result['load_start']} at the start, "
        f"{result['load_end']} at the end.\n\n| stage | seconds | peak RSS (GB) |\n|---|---|---|\n{rows}\n\n"
        f"t2i-train's steps (from its log; steps 1 and 3 are each the first of their process): "
        + ", ".join(f"step {k} {v:.0f} s" for k, v in result["train_step_s"].items()) + ".\n")
    log(f"smoke-sd15 passed; {OUT / 'smoke-sd15.md'}")


if __name__ == "__main__":
    main()
