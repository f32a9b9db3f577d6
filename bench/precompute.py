"""Section 3: `t2i.precompute.run` on a fresh store vs a bare VAE+CLIP forward over the same batches."""

import shutil
import statistics
import time

import numpy as np

from bench import NUM_IMAGES
from bench.inputs import centre_crops
from bench.timing import interleaved, paired_ratio, quiet


def pixel_batches(data_dir, resolution, batch_size, flip):
    """What precompute feeds the encoders, batch by batch: (pixels with flipped copies, captions), decoded once."""
    samples = centre_crops(data_dir, resolution)
    out = []
    for b in range(0, len(samples), batch_size):
        part = samples[b : b + batch_size]
        x = np.stack([pixels for _, pixels in part])
        if flip:
            x = np.concatenate([x, x[..., ::-1]])
        out.append((np.ascontiguousarray(x), [c for s, _ in part for c in s.captions]))
    return out


def bench_precompute(model, data_dir, resolution, repeats, work):
    """Returns (result, path of the last fresh store), which the training sections then use."""
    import mindspore as ms

    from t2i.interop import models
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
