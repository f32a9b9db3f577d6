"""The inputs every MindSpore section measures on: the tiny model and the demo images, decoded as precompute does."""

import shutil

from bench import NUM_IMAGES, WORK
from bench.timing import quiet


def prepare(work=WORK):
    """The tiny model (and the loop section's variants of it) and the demo images, made fresh (all deterministic given
    their seeds)."""
    from bench.loop_models import make_loop_models
    from t2i.core import runtime
    from t2i.demo.shapes import make_demo_data
    from t2i.demo.tiny import build_tiny_model

    runtime.setup("CPU")
    for name in ("tiny-model", "data"):
        shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    with quiet():
        build_tiny_model(work / "tiny-model")
        make_demo_data(work / "data", num_images=NUM_IMAGES, size=64)
        make_loop_models(work)
    return work / "tiny-model", work / "data"


def centre_crops(data_dir, resolution):
    """The imagefolder's samples with their centre-cropped pixels: [(sample, pixels (3, H, W))], decoded once."""
    from t2i.data.dataset import read_imagefolder
    from t2i.data.images import crops, decode_image, to_array

    return [(s, to_array(crops(decode_image(s.read(), 1 << 30), resolution, True, 1, None)[0][0]))
            for s in read_imagefolder(data_dir)]
