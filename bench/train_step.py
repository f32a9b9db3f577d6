"""Sections 1 and 2: the training step on the latent store vs on ready tensors, a bare UNet forward+backward and a
seed-style step that encodes its batch first."""

import shutil
import statistics

import numpy as np

from bench.inputs import centre_crops
from bench.timing import interleaved, paired_ratio, quiet, summary


def sample_pixels(data_dir, resolution):
    """sample id -> (pixels, captions) for the seed-style step."""
    return {s.id: (pixels, s.captions) for s, pixels in centre_crops(data_dir, resolution)}


class EncodingStore:
    """Stands in for the latent store in `train.fit` and encodes the requested samples on every read, as the seed
    script does each step: VAE moments of each image (flipped with p=0.5) and CLIP states of its caption."""

    def __init__(self, store, pixels, vae, tokenizer, text_encoder, seed=0):
        self.ids = [str(i) for i in store["sample_id"][:]]
        self.pixels, self.vae, self.tokenizer, self.text_encoder = pixels, vae, tokenizer, text_encoder
        self.rng = np.random.default_rng(seed)

    def read(self, slots):
        import mindspore as ms

        from t2i.data.store import Rows
        from t2i.interop import models

        images, captions = zip(*(self.pixels[self.ids[s]] for s in slots))
        x = np.stack([img[..., ::-1] if flip else img for img, flip in zip(images, self.rng.random(len(images)) < 0.5)])
        moments = self.vae.encode(ms.Tensor(np.ascontiguousarray(x)))[0].asnumpy()
        states = models.encode_text(self.tokenizer, self.text_encoder, [c[0] for c in captions]).asnumpy()
        return Rows(moments[:, None], states[:, None], np.ones(len(slots), np.int32))


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


def step_on_tensors(step, inputs):
    """One train step on ready tensors, waited for."""
    loss, grad_norm, _ = step(*inputs)
    grad_norm.asnumpy()  # a function of every gradient: the compiled backward is done
    loss.asnumpy()


def bare_fwd_bwd(unet, jit=False):
    """Forward, MSE and gradients w.r.t. every UNet parameter; no optimizer, no clipping, no data. jit: as one
    ms.jit graph, as t2i-train runs it by default."""
    import mindspore as ms

    def loss_fn(noisy, timesteps, target, states):
        return ((unet(noisy, timesteps, states)[0] - target) ** 2).mean()

    grad_fn = ms.value_and_grad(loss_fn, None, unet.trainable_params())
    if jit:
        grad_fn = ms.jit(grad_fn)

    def run(inputs):
        loss, grads = grad_fn(*inputs[:3], inputs[4])  # Batch.arrays: no weights
        # Wait for conv_in's gradient, the backward's last output, first: waiting on a compiled graph's early output
        # (the loss) while its backward still runs made the call 2-5x slower on this 2-core machine (measured).
        grads[0].asnumpy()
        loss.asnumpy()

    return run


def bench_train_step(model, store_path, data_dir, resolution, batch, repeats, work):
    from t2i import train
    from t2i.data.store import LatentStore
    from t2i.interop import models
    from t2i.training.runlog import Logger
    from t2i.training.step import build_train_step

    out = work / f"train-{resolution}-b{batch}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = train.TrainConfig(
        pretrained_model_name_or_path=str(model), latent_store=str(store_path), output_dir=str(out),
        train_batch_size=batch, max_train_steps=1000, learning_rate=1e-4, lr_warmup_steps=0, snr_gamma=5.0,
        checkpointing_steps=10**9, num_validation_samples=0, report_to="none", device_target="CPU",
    )
    with quiet():
        r = train.setup(cfg)
        logger = Logger(cfg.log_dir, 0, cfg.report_to)
    buckets, state = r.data.buckets, r.state
    reader = (buckets.readers or buckets.stores)[0]  # what t2i-train reads batches from: RAM or the store
    state.train_step = recorder = Recorder(state.train_step)
    vae = models.load_vae(model)
    tokenizer, text_encoder = models.load_text_encoder(model)
    encoding = EncodingStore(r.data.store, sample_pixels(data_dir, resolution), vae, tokenizer, text_encoder)
    fwd_bwd, fwd_bwd_jit = bare_fwd_bwd(state.unet), bare_fwd_bwd(state.unet, jit=True)
    pynative_step = build_train_step(state.unet, state.optimizer, None, cfg.max_grad_norm, 1, jit=False)

    def fit_one(step, source):
        buckets.readers = [source]
        with quiet():
            train.fit(cfg, r, step, step + 1, logger)

    runs = interleaved({
        "cached_step": lambda r: fit_one(r, reader),
        "train_step_on_tensors": lambda r: step_on_tensors(recorder.step, recorder.inputs),
        "train_step_no_jit": lambda r: step_on_tensors(pynative_step, recorder.inputs),
        "unet_fwd_bwd": lambda r: fwd_bwd(recorder.inputs),
        "unet_fwd_bwd_jit": lambda r: fwd_bwd_jit(recorder.inputs),
        "seed_style_step": lambda r: fit_one(r, encoding),
    }, repeats)
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
