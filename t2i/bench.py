"""`make bench`: what one t2i training step costs on this machine, and what caching the latents saves.

Every figure is the median of `--repeats` timed runs after one untimed warm-up. Every ratio is the median of
per-repeat ratios between variants run back to back in the same process, so that drifting load from other jobs on
the machine cancels out of it as far as it can. The sections:

1. data path: the real training step on a latent store (`train.fit` for one step: store read, make_batch, mindone
   TrainStep) vs the same TrainStep on ready tensors vs a bare UNet forward+backward, all on the same batch;
2. caching: that step vs a seed-style step, which VAE+CLIP-encodes the same batch's images and captions first
   (`train.fit` again, reading from an object that encodes instead of the store);
3. precompute: `t2i.precompute.run` on a fresh store vs a bare VAE+CLIP forward over the same batches;
4. peer: the same UNet train step (forward, backward, clipping, AdamW) and a 10-step DDIM pipeline call in PyTorch
   diffusers, run by `--peer` in .venv-peer (so this module imports neither MindSpore nor t2i.train at its top);
5. memory: peak RSS of `t2i-train` on the demo-sized store vs one 100x larger, and on each store the time
   `LatentStore.read` takes for a batch of random rows (train's per-epoch permutation) vs a batch of consecutive rows.
`--sd15` instead times the SD-1.5 geometry (random weights, batch 1: UNet, VAE at 512 px, CLIP-L) in a subprocess of
its own, and PyTorch's in .venv-peer, into bench/results-sd15.*.
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench"
WORK = OUT / "work.tmp"
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
NUM_IMAGES = 96
# (image resolution, batch size) of the tiny model: 16x16 and 32x32 latents.
TINY_CONFIGS = ((32, 2), (32, 8), (64, 2), (64, 8))
PIPELINE_RESOLUTIONS = (32, 64)
DDIM_STEPS = 10
PROMPT = "a red circle"
RSS_STEPS = 20
RSS_FACTOR = 100
# A batch read takes milliseconds: many repeats make its median steady.
READ_REPEATS = 50
READ_BATCH = 8
# Rows of the random store read at SD-1.5 geometry (246 KB a row: 250 MB), where a row's bytes, not the number of
# zarr calls, decide what a read costs.
SD15_READ_ROWS = 1024
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
# MindSpore's SD-1.5 train step (fp32, AdamW) was OOM-killed at 24.0 GB RSS on the 24 GB bench machine; with less
# memory within reach it is not attempted, since the OOM killer might pick another process.
SD15_TRAIN_MIN_FREE_GB = 26.0
# PyTorch's SD-1.5 train step peaks at 15.6 GB RSS (anchors).
PEER_SD15_TRAIN_MIN_FREE_GB = 16.5
# An SD-1.5 train step is slow on 2 cores: one timed step of each kind after the warm-up.
SD15_TRAIN_REPEATS = 1


# ---------------------------------------------------------------------------------------------------------------------
# Timing


def timed(fn):
    tick = time.perf_counter()
    fn()
    return time.perf_counter() - tick


def interleaved(variants, repeats, warmup=1):
    """name -> timed runs: every repeat runs every variant once, in the given order; warm-up runs are dropped."""
    runs = {name: [] for name in variants}
    for r in range(warmup + repeats):
        for name, fn in variants.items():
            dt = timed(lambda: fn(r))
            if r >= warmup:
                runs[name].append(dt)
    return runs


def summary(runs):
    return {name: {"median_s": statistics.median(v), "runs_s": v} for name, v in runs.items()}


def paired_ratio(a, b):
    """Median of a_i / b_i over repeats, each pair measured back to back."""
    return statistics.median(x / y for x, y in zip(a, b))


def loadavg():
    return [round(x, 2) for x in os.getloadavg()]


def _meminfo_gb(path, key):
    for line in Path(path).read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 2**20
    return float("nan")


def mem_available_gb():
    """Memory this process could reach: what the machine has available plus what the process already holds."""
    return _meminfo_gb("/proc/meminfo", "MemAvailable:") + _meminfo_gb("/proc/self/status", "VmRSS:")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')} load {loadavg()[0]:.1f}] {msg}", flush=True)


@contextlib.contextmanager
def quiet():
    """Silence the stages' own progress output (config dumps, tqdm bars) while they are being timed."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def git(*args):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Machine facts


def machine_facts():
    import mindone
    import mindspore as ms

    from t2i import cpu_ops

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "mem_total_gb": round(os.sysconf("SC_PHYS_PAGES") *
                                                                   os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "python": platform.python_version(), "mindspore": ms.__version__, "mindone": mindone.__version__,
        "device_target": ms.get_context("device_target"),
        "pynative_synchronize": ms.get_context("pynative_synchronize"),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_modified": (git("status", "--porcelain", "--untracked-files=no") or "").splitlines(),
        "cpu_ops": cpu_ops_state(cpu_ops),
    }


def cpu_ops_state(cpu_ops):
    """Which CPU substitutes were active: the file's hash and last commit say which version of them was measured."""
    from mindone.diffusers.models.attention_processor import Attention
    from mindspore import mint

    path = Path(cpu_ops.__file__)
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return {
        "installed": cpu_ops._installed,
        "attention_fast_path": Attention.math_attention_op is cpu_ops.math_attention_op,
        "softmax_fast_path": mint.softmax is cpu_ops.softmax,
        "linear_fast_path": mint.nn.Linear is cpu_ops.Linear,
        "substitutes": sorted([*cpu_ops.MINT, *(f"nn.{k}" for k in cpu_ops.MINT_NN),
                               *(f"nn.functional.{k}" for k in cpu_ops.MINT_F)]),
        "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16],
        "last_commit": git("log", "-1", "--format=%h %s", "--", str(rel)),
        "uncommitted_changes": bool(git("status", "--porcelain", "--", str(rel))),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Inputs


def prepare(work=WORK):
    """The tiny model and the demo images, made fresh (both are deterministic given their seeds)."""
    from t2i import runtime
    from t2i.tiny import build_tiny_model, make_demo_data

    runtime.setup("CPU")
    for name in ("tiny-model", "data"):
        shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    with quiet():
        build_tiny_model(work / "tiny-model")
        make_demo_data(work / "data", num_images=NUM_IMAGES, size=64)
    return work / "tiny-model", work / "data"


def pixel_batches(data_dir, resolution, batch_size, flip):
    """What precompute feeds the encoders, batch by batch: (pixels with flipped copies, captions), decoded once."""
    from t2i.images import crops, decode_image, to_array
    from t2i.dataset import read_imagefolder

    samples = read_imagefolder(data_dir)
    out = []
    for b in range(0, len(samples), batch_size):
        part = samples[b : b + batch_size]
        x = np.stack([to_array(crops(decode_image(s.read(), 1 << 30), resolution, True, 1, None)[0][0])
                      for s in part])
        if flip:
            x = np.concatenate([x, x[..., ::-1]])
        out.append((np.ascontiguousarray(x), [c for s in part for c in s.captions]))
    return out


def sample_pixels(data_dir, resolution):
    """sample id -> (pixels, captions) for the seed-style step."""
    from t2i.images import crops, decode_image, to_array
    from t2i.dataset import read_imagefolder

    return {s.id: (to_array(crops(decode_image(s.read(), 1 << 30), resolution, True, 1, None)[0][0]), s.captions)
            for s in read_imagefolder(data_dir)}


class EncodingStore:
    """Stands in for the latent store in `train.fit` and encodes the requested samples on every read, as the seed
    script does each step: VAE moments of each image (flipped with p=0.5) and CLIP states of its caption."""

    def __init__(self, store, pixels, vae, tokenizer, text_encoder, seed=0):
        self.ids = [str(i) for i in store["sample_id"][:]]
        self.pixels, self.vae, self.tokenizer, self.text_encoder = pixels, vae, tokenizer, text_encoder
        self.rng = np.random.default_rng(seed)

    def read(self, slots):
        import mindspore as ms

        from t2i import models

        images, captions = zip(*(self.pixels[self.ids[s]] for s in slots))
        x = np.stack([img[..., ::-1] if flip else img for img, flip in zip(images, self.rng.random(len(images)) < 0.5)])
        moments = self.vae.encode(ms.Tensor(np.ascontiguousarray(x)))[0].asnumpy()
        states = models.encode_text(self.tokenizer, self.text_encoder, [c[0] for c in captions]).asnumpy()
        return moments[:, None], states[:, None], np.ones(len(slots), np.int32)


class Recorder:
    """Wraps the TrainStep so the bench can replay the exact tensors `fit` fed it."""

    def __init__(self, step):
        self.step = step
        self.inputs = None

    def __call__(self, *inputs):
        self.inputs = inputs
        return self.step(*inputs)

    def __getattr__(self, name):
        return getattr(self.step, name)


# ---------------------------------------------------------------------------------------------------------------------
# Sections 1 and 2: the training step


def bare_fwd_bwd(unet, jit=False):
    """Forward, MSE and gradients w.r.t. every UNet parameter; no optimizer, no clipping, no data. jit: as one
    ms.jit graph, as t2i-train runs it by default."""
    import mindspore as ms

    def loss_fn(noisy, timesteps, states, target):
        return ((unet(noisy, timesteps, states)[0] - target) ** 2).mean()

    grad_fn = ms.value_and_grad(loss_fn, None, unet.trainable_params())
    if jit:
        grad_fn = ms.jit(grad_fn)

    def run(inputs):
        loss, grads = grad_fn(*inputs[:4])
        # Wait for conv_in's gradient, the backward's last output, first: waiting on a compiled graph's early output
        # (the loss) while its backward still runs made the call 2-5x slower on this 2-core machine (measured).
        grads[0].asnumpy()
        loss.asnumpy()

    return run


def bench_train_step(model, store_path, data_dir, resolution, batch, repeats, work):
    from t2i import models, train
    from t2i.runlog import Logger
    from t2i.step import build_train_step
    from t2i.store import LatentStore

    out = work / f"train-{resolution}-b{batch}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = train.TrainConfig(
        pretrained_model_name_or_path=str(model), latent_store=str(store_path), output_dir=str(out),
        train_batch_size=batch, max_train_steps=1000, learning_rate=1e-4, lr_warmup_steps=0, snr_gamma=5.0,
        checkpointing_steps=10**9, num_validation_samples=0, report_to="none", device_target="CPU",
    )
    with quiet():
        t = train.setup(cfg)
        logger = Logger(cfg, 0)
    store = t.store
    t.train_step = recorder = Recorder(t.train_step)
    vae = models.load_vae(model)
    tokenizer, text_encoder = models.load_text_encoder(model)
    encoding = EncodingStore(store, sample_pixels(data_dir, resolution), vae, tokenizer, text_encoder)
    fwd_bwd, fwd_bwd_jit = bare_fwd_bwd(t.unet), bare_fwd_bwd(t.unet, jit=True)
    pynative_step = build_train_step(t.unet, t.optimizer, None, cfg.max_grad_norm, 1, jit=False)

    def fit_one(step, source):
        t.store, t.max_steps = source, step + 1
        with quiet():
            train.fit(t, step, logger)

    def tensors_step(step):
        loss, grad_norm, _ = step(*recorder.inputs)
        grad_norm.asnumpy()  # a function of every gradient: the compiled backward is done
        loss.asnumpy()

    runs = interleaved({
        "cached_step": lambda r: fit_one(r, store),
        "train_step_on_tensors": lambda r: tensors_step(recorder.step),
        "train_step_no_jit": lambda r: tensors_step(pynative_step),
        "unet_fwd_bwd": lambda r: fwd_bwd(recorder.inputs),
        "unet_fwd_bwd_jit": lambda r: fwd_bwd_jit(recorder.inputs),
        "seed_style_step": lambda r: fit_one(r, encoding),
    }, repeats)
    t.store = store
    logger.close()
    latent = LatentStore.open(store_path).attrs["latent_shape"]
    return {
        "resolution": resolution, "batch": batch, "latent": latent[1:], "times": summary(runs),
        "ratios": {
            "cached_step / unet_fwd_bwd": paired_ratio(runs["cached_step"], runs["unet_fwd_bwd"]),
            "cached_step / unet_fwd_bwd_jit": paired_ratio(runs["cached_step"], runs["unet_fwd_bwd_jit"]),
            "train_step_no_jit / train_step_on_tensors": paired_ratio(runs["train_step_no_jit"],
                                                                      runs["train_step_on_tensors"]),
            "cached_step / train_step_on_tensors": paired_ratio(runs["cached_step"], runs["train_step_on_tensors"]),
            "cached_step / seed_style_step": paired_ratio(runs["cached_step"], runs["seed_style_step"]),
        },
        "samples_per_s": {"cached_step": batch / statistics.median(runs["cached_step"]),
                          "seed_style_step": batch / statistics.median(runs["seed_style_step"])},
    }


# ---------------------------------------------------------------------------------------------------------------------
# Section 3: precompute


def bench_precompute(model, data_dir, resolution, repeats, work):
    """Returns (result, path of the last fresh store), which the training sections then use."""
    import mindspore as ms

    from t2i import models
    from t2i.precompute import PrecomputeConfig, run

    store_path = work / f"latents-{resolution}.zarr"
    config = PrecomputeConfig(pretrained_model_name_or_path=str(model), train_data_dir=str(data_dir),
                              output_dir=str(store_path), resolution=resolution, center_crop=True, random_flip=True,
                              device_target="CPU")
    batches = pixel_batches(data_dir, resolution, config.batch_size, flip=True)
    vae = models.load_vae(model)
    tokenizer, text_encoder = models.load_text_encoder(model)
    rates = {"precompute": [], "bare_encode": []}
    wall = []

    def precompute(r):
        shutil.rmtree(store_path, ignore_errors=True)
        tick = time.perf_counter()
        with quiet():
            result = run(config)
        wall.append(time.perf_counter() - tick)
        rates["precompute"].append(result["images_per_s"])

    def bare(r):
        tick = time.perf_counter()
        for x, captions in batches:
            vae.encode(ms.Tensor(x))[0].asnumpy()
            models.encode_text(tokenizer, text_encoder, captions).asnumpy()
        rates["bare_encode"].append(NUM_IMAGES / (time.perf_counter() - tick))

    interleaved({"precompute": precompute, "bare_encode": bare}, repeats)
    rates = {k: v[1:] for k, v in rates.items()}
    return {
        "resolution": resolution, "images": NUM_IMAGES, "batch_size": config.batch_size, "random_flip": True,
        "repeats": repeats,
        "images_per_s": {k: {"median": statistics.median(v), "runs": v} for k, v in rates.items()},
        "precompute_wall_s_with_model_loading": statistics.median(wall[1:]),
        "ratio precompute / bare_encode": paired_ratio(rates["precompute"], rates["bare_encode"]),
    }, store_path


# ---------------------------------------------------------------------------------------------------------------------
# Section 4, MindSpore side: the pipeline call


def bench_pipeline_ms(model, repeats):
    """The pipeline call op by op (PyNative), and with t2i-infer --jit's compiled UNet (compile time apart)."""
    from mindone import diffusers

    from t2i import models

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(model))
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for res in PIPELINE_RESOLUTIONS:
        def call(_):
            pipe(PROMPT, num_inference_steps=DDIM_STEPS, height=res, width=res, output_type="np")

        def call_jit(_):
            with models.compiled(pipe.unet):
                call(_)

        compile_s = timed(lambda: call_jit(0)) - timed(lambda: call_jit(0))
        runs = interleaved({"pipeline": call, "pipeline_jit": call_jit}, repeats)
        out.append({"resolution": res, "ddim_steps": DDIM_STEPS, "times": summary(runs),
                    "jit_compile_s": compile_s,
                    "ratio pipeline / pipeline_jit": paired_ratio(runs["pipeline"], runs["pipeline_jit"])})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Section 5: peak RSS vs store size


def build_scaled_store(src_path, dst_path, factor, seed=0):
    """A store `factor` times larger than src without encoding: src's samples repeated, latent means perturbed.

    Attributes are src's (so the model fingerprint matches) and every slot is marked done, written last.
    """
    from t2i.store import LatentStore

    src = LatentStore.open(src_path)
    moments, text, counts = src.read(src.valid_slots())
    n = len(moments) * factor
    attrs = {k: v for k, v in src.attrs.items() if k not in ("schema_version", "tool_version", "created")}
    attrs.update(num_samples=n, skipped=[])
    shutil.rmtree(dst_path, ignore_errors=True)
    dst = LatentStore.create(dst_path, attrs, num_crops=src.attrs["num_crops"], random_flip=src.attrs["random_flip"],
                             moment_shape=moments.shape[2:], text_shape=text.shape[2:], max_captions=text.shape[1],
                             chunk_rows=src.chunk_rows, dtype=str(moments.dtype))
    dst.resize(n, text.shape[1])
    rng = np.random.default_rng(seed)
    half = moments.shape[2] // 2
    # Whole shard files per write, so that none is rewritten.
    block = src.chunk_rows * 16
    for start in range(0, n, block):
        idx = np.arange(start, min(n, start + block)) % len(moments)
        m = moments[idx].astype(np.float32)
        m[:, :, :half] += 0.1 * rng.standard_normal(m[:, :, :half].shape, dtype=np.float32)
        dst["moments"][start : start + len(idx)] = m.astype(moments.dtype)
        dst["text_states"][start : start + len(idx)] = text[idx]
    dst["num_captions"][:] = np.resize(counts, n)
    dst["crop"][:] = np.zeros((n,) + src["crop"].shape[1:], np.int32)
    dst["sample_id"][:] = np.array([f"synthetic-{i:07d}" for i in range(n)], dtype=object)
    dst["content_hash"][:] = np.array([""] * n, dtype=object)
    dst["done"][:] = np.ones(n, bool)
    return dst


def bench_store_read(store_path, batch, repeats, seed=0):
    """`LatentStore.read` of one batch of random rows vs one batch of consecutive rows, fresh rows every repeat (drawn
    before the timing). The store's files are in the page cache after the first reads, as during training."""
    from t2i.store import LatentStore

    store = LatentStore.open(store_path)
    slots = store.valid_slots()
    rng = np.random.default_rng(seed)
    runs_needed = repeats + 1  # interleaved's warm-up run, then the timed ones
    random_rows = [rng.choice(slots, batch, replace=False) for _ in range(runs_needed)]
    starts = rng.integers(0, len(slots) - batch + 1, runs_needed)
    runs = interleaved({"consecutive": lambda r: store.read(slots[starts[r] : starts[r] + batch]),
                        "random": lambda r: store.read(random_rows[r])}, repeats)
    return {"batch": batch, "times": summary(runs),
            "ratio random / consecutive": paired_ratio(runs["random"], runs["consecutive"])}


def build_random_store(path, rows, moment_shape, text_shape, chunk_rows=32):
    """A store of random fp16 rows (flips stored, one caption each) made without a model, for timing reads only."""
    from t2i.store import LatentStore

    shutil.rmtree(path, ignore_errors=True)
    store = LatentStore.create(path, {}, num_crops=1, random_flip=True, moment_shape=moment_shape,
                               text_shape=text_shape, max_captions=1, chunk_rows=chunk_rows, dtype="float16")
    store.resize(rows, 1)
    rng = np.random.default_rng(0)
    block = chunk_rows * 8  # whole shard files per write
    for start in range(0, rows, block):
        n = min(block, rows - start)
        store["moments"][start : start + n] = rng.standard_normal((n, 2, *moment_shape), np.float32).astype(np.float16)
        store["text_states"][start : start + n] = rng.standard_normal((n, 1, *text_shape), np.float32).astype(
            np.float16)
    store["num_captions"][:] = np.ones(rows, np.int32)
    store["done"][:] = np.ones(rows, bool)
    return store


def dir_bytes(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


TRAIN_WITH_PEAK_RSS = """
import atexit, runpy, sys
from pathlib import Path
from t2i.bench import peak_rss_mb
out = Path(sys.argv.pop(1))
atexit.register(lambda: out.write_text(str(peak_rss_mb())))
runpy.run_module("t2i.train", run_name="__main__")
"""


def train_subprocess(model, store, out, steps, batch):
    """Run t2i-train in a child process; returns its own peak RSS, written at its exit, and its median step time."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "T2I_HOME": str(out.parent / "t2i-home")}
    rss_file = out.parent / f"{out.name}.peak_rss_mb"
    rss_file.unlink(missing_ok=True)
    args = [sys.executable, "-c", TRAIN_WITH_PEAK_RSS, str(rss_file), "--pretrained_model_name_or_path", str(model),
            "--latent_store",
            str(store), "--output_dir", str(out), "--train_batch_size", str(batch), "--max_train_steps", str(steps),
            "--lr_warmup_steps", "0", "--checkpointing_steps", "1000000", "--num_validation_samples", "4",
            "--report_to", "none", "--device_target", "CPU"]
    with open(out.parent / f"{out.name}.log", "w") as f:
        code = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code != 0:
        raise RuntimeError(f"t2i-train on {store} failed; see {out.parent / f'{out.name}.log'}")
    lines = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines() if line]
    step_s = statistics.median(batch / r["samples_per_s"] for r in lines[3:])
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
    from t2i.store import LatentStore

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


# ---------------------------------------------------------------------------------------------------------------------
# SD-1.5 geometry (MindSpore), in a subprocess of its own


def peak_rss_mb():
    """This process's own peak RSS (VmHWM). getrusage's ru_maxrss is no use here: Linux carries the high-water mark
    of the image a process was exec'ed from, so a child of the large bench process would report the parent's peak."""
    return _meminfo_gb("/proc/self/status", "VmHWM:") * 1024


def sd15_worker(repeats, out_path):
    """SD-1.5 UNet forward, VAE(512)+CLIP-L encode and, when memory allows, the train step and a seed-style step."""
    import mindspore as ms
    from transformers import CLIPTextConfig

    from mindone.diffusers import AutoencoderKL, UNet2DConditionModel
    from mindone.transformers import CLIPTextModel
    from t2i import runtime
    from t2i.optim import build_adamw
    from t2i.step import build_train_step

    runtime.setup("CPU")
    ms.set_seed(0)
    rng = np.random.default_rng(0)
    result = {"repeats": repeats, "mem_within_reach_gb_at_start": round(mem_available_gb(), 1),
              "load_start": loadavg()}
    tick = time.perf_counter()
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD15_VAE)
    clip = CLIPTextModel(CLIPTextConfig(**SD15_CLIP))
    clip.set_train(False)
    result["build_s"] = time.perf_counter() - tick
    result["unet_params_m"] = sum(p.size for p in unet.trainable_params()) / 1e6
    noisy = ms.Tensor(rng.standard_normal((1, 4, 64, 64), dtype=np.float32))
    timesteps = ms.Tensor(np.array([500], np.int32))
    states = ms.Tensor(rng.standard_normal((1, 77, 768), dtype=np.float32))
    target = ms.Tensor(rng.standard_normal((1, 4, 64, 64), dtype=np.float32))
    weights = ms.Tensor(np.ones(1, np.float32))
    image = ms.Tensor(rng.uniform(-1, 1, (1, 3, SD15_RESOLUTION, SD15_RESOLUTION)).astype(np.float32))
    ids = ms.Tensor(rng.integers(0, SD15_CLIP["vocab_size"], (1, 77)).astype(np.int32))

    def encode(_):
        vae.encode(image)[0].asnumpy()
        clip(ids)[0].asnumpy()

    def forward(_):
        unet(noisy, timesteps, states)[0].asnumpy()

    unet.set_train(False)
    runs = interleaved({"unet_forward": forward, "vae512_clip_encode": encode}, repeats)
    result["times"] = summary(runs)
    result["peak_rss_mb_inference"] = result["peak_rss_mb"] = peak_rss_mb()
    result["load_end"] = loadavg()
    result["train_step"] = "did not finish"
    # Written now and again after each train variant: running out of memory there must not lose these figures.
    Path(out_path).write_text(json.dumps(result, indent=2))
    free = mem_available_gb()
    if free < SD15_TRAIN_MIN_FREE_GB:
        result["train_step"] = (f"skipped: {free:.1f} GB of memory within reach, the MindSpore SD-1.5 train step "
                                f"needs about {SD15_TRAIN_MIN_FREE_GB:.0f} GB")
        Path(out_path).write_text(json.dumps(result, indent=2))
        return
    unet.set_train(True)
    optimizer = build_adamw(unet.trainable_params(), 1e-5)
    step = build_train_step(unet, optimizer, None, 1.0, 1)
    inputs = (noisy, timesteps, states, target, weights)
    # One variant after the other rather than interleaved: the seed-style step needs the most memory (the VAE's
    # 512 px activations on top of the train step's), so the plain step is measured first in case it fails.
    variants = {"train_step_on_tensors": lambda r: step(*inputs)[0].asnumpy(),
                "seed_style_step": lambda r: (encode(r), step(*inputs)[0].asnumpy())}
    for name, fn in variants.items():
        try:
            result["times"].update(summary(interleaved({name: fn}, SD15_TRAIN_REPEATS)))
        except RuntimeError as e:
            reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            result["train_step"] = f"{name} failed at {peak_rss_mb() / 1024:.1f} GB peak RSS: {reason}"
            break
        else:
            if name == "seed_style_step":
                result["train_step"] = "measured"
        finally:
            result["peak_rss_mb"] = peak_rss_mb()
            result["load_end"] = loadavg()
            Path(out_path).write_text(json.dumps(result, indent=2))
    if "seed_style_step" in result["times"]:
        t = result["times"]
        result["ratio train_step / seed_style_step"] = (t["train_step_on_tensors"]["median_s"]
                                                        / t["seed_style_step"]["median_s"])
        Path(out_path).write_text(json.dumps(result, indent=2))


def bench_sd15(repeats, work):
    out = work / "sd15.json"
    out.unlink(missing_ok=True)
    args = [sys.executable, "-m", "t2i.bench", "--sd15-worker", str(out), "--repeats", str(repeats)]
    with open(work / "sd15.log", "w") as f:
        code = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if not out.is_file():
        return {"error": f"the SD-1.5 worker exited with {code}; see {work / 'sd15.log'}"}
    result = json.loads(out.read_text())
    if code != 0:
        result["train_step"] += f" (the worker exited with {code}, e.g. killed for lack of memory)"
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Section 4, PyTorch side (runs in .venv-peer: imports torch, never mindspore)


def peer_train_step(unet, batch, latent, text_shape, repeats, torch):
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn((batch, 4, latent, latent), generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    states = torch.randn((batch, *text_shape), generator=g)
    target = torch.randn((batch, 4, latent, latent), generator=g)
    weights = torch.ones(batch)

    def loss():
        pred = unet(noisy, timesteps, states).sample
        return (((pred - target) ** 2).mean(dim=(1, 2, 3)) * weights).mean()

    def fwd_bwd(_):
        loss().backward()
        opt.zero_grad(set_to_none=True)

    def step(_):
        loss().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return summary(interleaved({"train_step_on_tensors": step, "unet_fwd_bwd": fwd_bwd}, repeats))


def peer_main(work, out_path, repeats, sd15):
    """The tiny-model figures, or with sd15 only the SD-1.5 ones (which need no tiny model)."""
    import diffusers
    import torch
    import transformers

    result = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
              "torch_threads": torch.get_num_threads(), "load_start": loadavg(), "repeats": repeats,
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if sd15:
        result["sd15"] = peer_sd15(torch, diffusers, transformers, repeats)
    else:
        result.update(peer_tiny(work, repeats, torch, diffusers))
    result["peak_rss_mb"] = peak_rss_mb()
    result["load_end"] = loadavg()
    Path(out_path).write_text(json.dumps(result, indent=2))
    print(f"wrote {out_path}")


def peer_tiny(work, repeats, torch, diffusers):
    model = work / "tiny-model"
    if not (model / "model_index.json").is_file():
        sys.exit(f"{model} is missing: run `.venv/bin/python -m t2i.bench --prepare` (make bench-peer does) first")
    result = {"train_step": [], "pipeline": []}
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(model / "unet"))
    vae_config = json.loads((model / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    # The text length the MindSpore side trains with: the tokenizer's (the store holds states padded to it).
    length = json.loads((model / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"]
    text_shape = (length, unet.config.cross_attention_dim)
    for res, batch in TINY_CONFIGS:
        times = peer_train_step(unet, batch, res // factor, text_shape, repeats, torch)
        result["train_step"].append({"resolution": res, "batch": batch, "times": times})
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for res in PIPELINE_RESOLUTIONS:
            runs = interleaved({"pipeline": lambda r: pipe(PROMPT, num_inference_steps=DDIM_STEPS, height=res,
                                                           width=res, output_type="np")}, repeats)
            result["pipeline"].append({"resolution": res, "ddim_steps": DDIM_STEPS, "times": summary(runs)})
    return result


def peer_sd15(torch, diffusers, transformers, repeats):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**SD15_UNET)
    vae = diffusers.AutoencoderKL(**SD15_VAE).eval()
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_CLIP)).eval()
    image = torch.rand((1, 3, SD15_RESOLUTION, SD15_RESOLUTION)) * 2 - 1
    ids = torch.randint(0, SD15_CLIP["vocab_size"], (1, 77))
    noisy, states = torch.randn((1, 4, 64, 64)), torch.randn((1, 77, 768))

    def encode(_):
        with torch.no_grad():
            vae.encode(image).latent_dist.mean
            clip(ids)[0]

    def forward(_):
        with torch.no_grad():
            unet(noisy, torch.tensor([500]), states).sample

    unet.eval()
    times = summary(interleaved({"unet_forward": forward, "vae512_clip_encode": encode}, repeats))
    result = {"times": times, "train_step": "measured"}
    free = mem_available_gb()
    if free < PEER_SD15_TRAIN_MIN_FREE_GB:
        result["train_step"] = f"skipped: {free:.1f} GB of memory within reach, PyTorch needs about 15.6 GB"
    else:
        times.update(peer_train_step(unet, 1, 64, (77, 768), repeats, torch))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_peer(repeats, sd15, out_path):
    """Run the PyTorch side in .venv-peer, now, so its figures come from the same run as MindSpore's."""
    try:
        subprocess.run([str(PEER_PYTHON), "-c", "import torch, diffusers"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    args = [str(PEER_PYTHON), "-m", "t2i.bench", "--peer", "--repeats", str(repeats), "--peer-out", str(out_path)]
    if sd15:
        args += ["--sd15", "--sd15_repeats", str(repeats)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(WORK / f"{out_path.stem}.log", "w") as f:
        subprocess.run(args, check=True, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Report


def fmt_s(x):
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def header(results):
    m = results["machine"]
    return (
        f"Measured {results['measured_at']} on {m['nproc']} cores ({m['cpu']}), MindSpore {m['mindspore']}, "
        f"mindone {m['mindone']}, commit {m['git_commit']}, t2i/cpu_ops.py at {m['cpu_ops']['last_commit']!r}"
        f"{' (+ uncommitted changes)' if m['cpu_ops']['uncommitted_changes'] else ''}; load average "
        f"{results['load_start'][0]} at the start, {results['load_end'][0]} at the end (other jobs were running). "
        f"Medians of {results['repeats']} runs after a warm-up; ratios are medians of per-repeat ratios; `load` is "
        "the 1-minute load average when the row finished."
    )


def markdown(results):
    lines = [
        header(results),
        "",
        "**Training step, tiny model** (cached = the real loop on the latent store; seed-style = the same loop "
        "encoding the batch with VAE+CLIP first)",
        "",
        "| images | latents | batch | UNet fwd+bwd (PyNative / jit) | TrainStep on tensors (--no_jit / jit) | "
        "cached step | seed-style step | cached / fwd+bwd jit | cached / TrainStep | cached / seed-style | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["train_step"]:
        t, q = r["times"], r["ratios"]
        lat = "x".join(map(str, r["latent"]))
        lines.append(
            f"| {r['resolution']} px | {lat} | {r['batch']} | {fmt_s(t['unet_fwd_bwd']['median_s'])} / "
            f"{fmt_s(t['unet_fwd_bwd_jit']['median_s'])} | {fmt_s(t['train_step_no_jit']['median_s'])} / "
            f"{fmt_s(t['train_step_on_tensors']['median_s'])} | {fmt_s(t['cached_step']['median_s'])} | "
            f"{fmt_s(t['seed_style_step']['median_s'])} | {q['cached_step / unet_fwd_bwd_jit']:.2f} | "
            f"{q['cached_step / train_step_on_tensors']:.2f} | {q['cached_step / seed_style_step']:.2f} | "
            f"{r['load'][0]} |")
    lines += ["", f"**Precompute** ({NUM_IMAGES} images with flips, batch 8, median of "
              f"{results['precompute'][0]['repeats']} runs)", "",
              "| images | t2i.precompute.run | bare VAE+CLIP forward | precompute / bare | load |",
              "|---|---|---|---|---|"]
    for r in results["precompute"]:
        ips = r["images_per_s"]
        lines.append(f"| {r['resolution']} px | {ips['precompute']['median']:.1f} img/s | "
                     f"{ips['bare_encode']['median']:.1f} img/s | {r['ratio precompute / bare_encode']:.2f} | "
                     f"{r['load'][0]} |")
    peer = results.get("peer")
    lines += ["", "**MindSpore vs PyTorch diffusers, CPU, same geometry**", ""]
    if peer is None:
        lines.append("Not measured: run `make bench-peer` (creates .venv-peer with torch) and `make bench` again.")
    else:
        lines += [f"PyTorch {peer['torch']}, diffusers {peer['diffusers']}, {peer['torch_threads']} threads; "
                  f"{peer['source']}, in its own process (load {peer['load_start'][0]} -> {peer['load_end'][0]}), "
                  "so the ratio is of the two medians.", "",
                  "| what | images | batch | MindSpore | PyTorch | MindSpore / PyTorch |", "|---|---|---|---|---|---|"]
        ms_steps = {(r["resolution"], r["batch"]): r["times"] for r in results["train_step"]}
        for r in peer["train_step"]:
            mine = ms_steps.get((r["resolution"], r["batch"]))
            if mine is None:
                continue
            for key, peer_key, label in (
                    ("unet_fwd_bwd", "unet_fwd_bwd", "UNet fwd+bwd, PyNative"),
                    ("unet_fwd_bwd_jit", "unet_fwd_bwd", "UNet fwd+bwd, jit"),
                    ("train_step_no_jit", "train_step_on_tensors", "train step (+AdamW), --no_jit"),
                    ("train_step_on_tensors", "train_step_on_tensors", "train step (+AdamW), jit (default)")):
                a, b = mine[key]["median_s"], r["times"][peer_key]["median_s"]
                lines.append(f"| {label} | {r['resolution']} px | {r['batch']} | {fmt_s(a)} | {fmt_s(b)} | "
                             f"{a / b:.2f} |")
        ms_pipe = {r["resolution"]: r["times"] for r in results["pipeline"]}
        compile_s = {r["resolution"]: r["jit_compile_s"] for r in results["pipeline"]}
        for r in peer["pipeline"]:
            for key, label in (("pipeline", "PyNative"), ("pipeline_jit", "--jit")):
                a, b = ms_pipe[r["resolution"]][key]["median_s"], r["times"]["pipeline"]["median_s"]
                lines.append(f"| pipeline, {r['ddim_steps']} DDIM steps, CFG, {label} | {r['resolution']} px | 1 | "
                             f"{fmt_s(a)} | {fmt_s(b)} | {a / b:.2f} |")
        lines += ["", "--jit compiles the UNet once per shape before the first call: "
                  + ", ".join(f"{v:.1f} s at {k} px" for k, v in compile_s.items()) + "."]
    mem = results["memory"]
    lines += ["", f"**Peak RSS of `t2i-train`** ({mem['steps']} steps of {mem['batch']} at {mem['resolution']} px, "
              f"median of {mem['runs']} runs each)", "",
              "| store | samples | on disk | peak RSS | step time |", "|---|---|---|---|---|"]
    for name in ("small", "x100"):
        s = mem[name]
        lines.append(f"| {'demo' if name == 'small' else '100x'} | {s['samples']} | {s['store_mb']:.1f} MB | "
                     f"{s['peak_rss_mb']:.0f} MB | {fmt_s(s['median_step_s'])} |")
    lines.append(f"| ratio 100x / demo | | | {mem['ratio peak_rss x100 / small']:.3f} | |")
    read = mem["x100"]["read_batch"]
    lines += ["", f"**One batch of {read['batch']} read from the store** (`LatentStore.read`, median of "
              f"{len(read['times']['random']['runs_s'])} reads, fresh rows each time)", "",
              "| store | consecutive rows | random rows | random / consecutive |", "|---|---|---|---|"]
    sd15 = mem["read_batch_sd15_geometry"]
    for label, r in (("demo", mem["small"]["read_batch"]), ("100x", mem["x100"]["read_batch"]),
                     (f"SD-1.5 geometry ({sd15['rows']} rows of noise)", sd15)):
        ms = {k: f"{r['times'][k]['median_s'] * 1000:.1f} ms" for k in ("consecutive", "random")}
        lines.append(f"| {label} | {ms['consecutive']} | {ms['random']} | {r['ratio random / consecutive']:.2f} |")
    return "\n".join(lines)


def markdown_sd15(results):
    sd, peer = results["sd15"], results.get("peer")
    lines = [header(results), ""]
    lines += ["**SD-1.5 geometry, batch 1, random weights** (64x64 latents, 77x768 text; VAE at 512 px, "
              "CLIP-L)", ""]
    if "error" in sd:
        lines.append(sd["error"])
    else:
        peer_sd = (peer or {}).get("sd15", {}).get("times", {})
        lines += ["| what | MindSpore | PyTorch |", "|---|---|---|"]
        for key, label in (("unet_forward", "UNet forward"), ("vae512_clip_encode", "VAE(512) + CLIP-L encode"),
                           ("unet_fwd_bwd", "UNet fwd+bwd"), ("train_step_on_tensors", "train step (fwd+bwd+AdamW)"),
                           ("seed_style_step", "seed-style step (encode + train step)")):
            a = sd["times"].get(key, {}).get("median_s")
            b = peer_sd.get(key, {}).get("median_s")
            if a is None and b is None:
                continue
            lines.append(f"| {label} | {fmt_s(a) if a else '-'} | {fmt_s(b) if b else '-'} |")
        lines.append(f"| peak RSS | {sd['peak_rss_mb'] / 1024:.1f} GB | "
                     f"{(peer or {}).get('sd15', {}).get('peak_rss_mb', float('nan')) / 1024:.1f} GB |")
        notes = [f"MindSpore: {sd['train_step']}." if sd["train_step"] != "measured" else "",
                 f"PyTorch: {peer['sd15']['train_step']}."
                 if peer and peer.get("sd15", {}).get("train_step", "measured") != "measured" else ""]
        if "ratio train_step / seed_style_step" in sd:
            notes.append(f"MindSpore train step / seed-style step: {sd['ratio train_step / seed_style_step']:.2f}.")
        if "train_step_on_tensors" in sd["times"]:
            notes.append(f"MindSpore train steps: {SD15_TRAIN_REPEATS} timed run after a warm-up.")
        lines += ["", " ".join(n for n in notes if n)]
    return "\n".join(lines)


def attach_peer(results, peer_json, repeats, sd15):
    log("PyTorch peer")
    if run_peer(repeats, sd15, peer_json):
        results["peer"] = {**json.loads(peer_json.read_text()), "source": "measured in this run"}
    elif peer_json.is_file():
        peer = json.loads(peer_json.read_text())
        results["peer"] = {**peer, "source": f"from bench/{peer_json.name}, measured separately at "
                                             f"{peer['measured_at']} (load {peer['load_start'][0]}): no .venv-peer now"}
    else:
        log("no .venv-peer: run `make bench-peer` for the PyTorch comparison")


def write_results(results, name, table, started):
    results["load_end"] = loadavg()
    results["elapsed_s"] = time.time() - started
    (OUT / f"{name}.json").write_text(json.dumps(results, indent=2))
    (OUT / f"{name}.md").write_text(table(results) + "\n")
    print(table(results))
    log(f"wrote bench/{name}.json and bench/{name}.md in {results['elapsed_s'] / 60:.1f} min")


def main_bench(args):
    from t2i import runtime

    OUT.mkdir(exist_ok=True)
    runtime.setup("CPU")
    started = time.time()
    results = {"measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": loadavg(), "repeats": args.repeats,
               "machine": machine_facts()}
    log(f"machine: {results['machine']['nproc']} cores, MindSpore {results['machine']['mindspore']}")
    if args.sd15:
        log("SD-1.5 geometry (MindSpore)")
        results["repeats"] = args.sd15_repeats
        results["sd15"] = bench_sd15(args.sd15_repeats, WORK)
        attach_peer(results, OUT / "peer-sd15.json", args.sd15_repeats, True)
        write_results(results, "results-sd15", markdown_sd15, started)
        return
    model, data = prepare()
    results["precompute"], stores = [], {}
    for res in PIPELINE_RESOLUTIONS:
        log(f"precompute at {res} px")
        r, stores[res] = bench_precompute(model, data, res, args.precompute_repeats, WORK)
        r["load"] = loadavg()
        results["precompute"].append(r)
    results["train_step"] = []
    for res, batch in TINY_CONFIGS:
        log(f"train step at {res} px, batch {batch}")
        r = bench_train_step(model, stores[res], data, res, batch, args.repeats, WORK)
        r["load"] = loadavg()
        results["train_step"].append(r)
    log("pipeline call")
    results["pipeline"] = bench_pipeline_ms(model, args.repeats)
    log("peak RSS vs store size")
    results["memory"] = bench_memory(model, stores[32], WORK, args.rss_repeats)
    attach_peer(results, OUT / "peer.json", args.repeats, False)
    write_results(results, "results", markdown, started)


def cli(argv=None):
    parser = argparse.ArgumentParser(prog="python -m t2i.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (after one warm-up)")
    parser.add_argument("--precompute_repeats", type=int, default=3, help="precompute runs per resolution")
    parser.add_argument("--rss_repeats", type=int, default=2, help="t2i-train runs per store in the memory section")
    parser.add_argument("--sd15", action="store_true",
                        help="instead, the SD-1.5 geometry (slow: see README); writes bench/results-sd15.*")
    parser.add_argument("--sd15_repeats", type=int, default=2,
                        help="timed runs per SD-1.5 figure (MindSpore train steps: 1)")
    parser.add_argument("--prepare", action="store_true", help="only build the tiny model the peer side loads")
    parser.add_argument("--peer", action="store_true", help="the PyTorch side; run with .venv-peer's python")
    parser.add_argument("--peer-out", default=None)
    parser.add_argument("--sd15-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer:
        default_out = OUT / ("peer-sd15.json" if args.sd15 else "peer.json")
        peer_main(WORK, Path(args.peer_out or default_out), args.sd15_repeats if args.sd15 else args.repeats,
                  args.sd15)
    elif args.sd15_worker:
        sd15_worker(args.repeats, args.sd15_worker)
    elif args.prepare:
        prepare()
    else:
        main_bench(args)


if __name__ == "__main__":
    cli()
