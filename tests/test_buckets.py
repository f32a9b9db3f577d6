import json
import random

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from t2i import precompute
from t2i.buckets import bucket_sizes, epoch_batches, nearest_bucket
from t2i.images import crops
from t2i.precompute import PrecomputeConfig, run
from t2i.sampling import epoch_order
from t2i.store import LatentStore, StoreError
from t2i.tiny import make_demo_data, render_aspect

# 32 px in steps of 8 up to 2:1: the three buckets the demo's ratios 0.5, 1 and 2 fall into (24x48 -> 24x40, 48x24 ->
# 40x24); one round of the 12 classes per ratio, 12 images each.
BUCKETS = dict(resolution=32, bucket_step=8, max_aspect_ratio=2.0, aspect_buckets=True)


def test_bucket_sizes():
    # kohya's 512 px buckets in 64 px steps, up to 2:1.
    assert bucket_sizes(512, 64, 2.0) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    assert bucket_sizes(32, 8, 2.0) == [(24, 40), (32, 32), (40, 24)]
    assert bucket_sizes(32, 8, 1.0) == [(32, 32)]


def test_nearest_bucket():
    sizes = bucket_sizes(512, 64, 2.0)
    assert nearest_bucket(1000, 1000, sizes) == (512, 512)
    assert nearest_bucket(3000, 1000, sizes) == (640, 384)  # beyond the widest: the widest
    assert nearest_bucket(1000, 1600, sizes) == (384, 640)  # 0.625 is nearer 0.6 than 0.78
    assert nearest_bucket(1000, 1250, sizes) == (448, 576)


def test_crop_to_bucket_crops_least():
    img = Image.new("RGB", (200, 100))
    # Resized to 48x24 (covers 40x24), then 8 px cropped off the width only.
    [(centre, corner)] = crops(img, (40, 24), True, 1, None)
    assert centre.size == (40, 24) and corner == (0, 4)
    views = crops(img, (40, 24), False, 5, random.Random(0))
    assert {v.size for v, _ in views} == {(40, 24)} and all(top == 0 and 0 <= left <= 8 for _, (top, left) in views)
    [(_, corner)] = crops(Image.new("RGB", (100, 200)), (40, 24), True, 1, None)
    assert corner == (28, 0)  # a tall image into a wide bucket: resized to 40x80, cropped in height


def test_epoch_batches():
    buckets = [np.arange(0, 10), np.arange(10, 13), np.arange(13, 30)]
    batches = epoch_batches(buckets, 4, seed=3, epoch=1)
    assert len(batches) == 10 // 4 + 0 + 17 // 4
    for b, slots in batches:
        assert len(slots) == 4 and set(slots) <= set(buckets[b]) and len(set(slots)) == 4
    # Shuffled together: not all of bucket 0 first.
    assert [b for b, _ in batches] != sorted(b for b, _ in batches)
    again = epoch_batches(buckets, 4, seed=3, epoch=1)
    assert all(b == c and np.array_equal(s, t) for (b, s), (c, t) in zip(batches, again))
    other = epoch_batches(buckets, 4, seed=3, epoch=2)
    assert any(not np.array_equal(s, t) for (_, s), (_, t) in zip(batches, other))
    # One bucket: the batches are epoch_order's permutation cut in order.
    single = epoch_batches([np.arange(12)], 4, seed=5, epoch=0)
    np.testing.assert_array_equal(np.concatenate([s for _, s in single]), epoch_order(np.arange(12), 5, 0))


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("mixed") / "data", num_images=36, size=32,
                          aspect_ratios=(1.0, 2.0, 0.5))


@pytest.fixture(scope="module")
def bucket_store(tmp_path_factory, tiny_model, mixed_data):
    path = tmp_path_factory.mktemp("bucket-store") / "latents.zarr"
    run(PrecomputeConfig(pretrained_model_name_or_path=str(tiny_model), train_data_dir=str(mixed_data),
                         output_dir=str(path), center_crop=True, random_flip=True, **BUCKETS))
    return path


def counts(path):
    return {size: len(part.valid_slots()) for size, part in LatentStore.open(path).parts()}


def test_precompute_buckets(bucket_store):
    store = LatentStore.open(bucket_store)
    assert store.bucketed and counts(bucket_store) == {(24, 40): 12, (32, 32): 12, (40, 24): 12}
    for (w, h), part in store.parts():
        # 2 views (flips), 2 x 4 latent channels, the tiny VAE's factor 2.
        assert part["moments"].shape == (12, 2, 8, h // 2, w // 2)
    out = CliRunner().invoke(precompute.cli, ["--inspect", str(bucket_store)])
    assert out.exit_code == 0, out.output
    assert "aspect buckets: 3" in out.output and "40x24: 12 samples" in out.output
    assert "samples: 36 complete" in out.output


def test_train_refuses_a_bucket_store_in_one_line(tiny_model, bucket_store, tmp_path):
    from t2i import train

    out = CliRunner().invoke(train.cli, ["--pretrained_model_name_or_path", str(tiny_model), "--latent_store",
                                         str(bucket_store), "--output_dir", str(tmp_path / "out")])
    assert out.exit_code != 0 and "holds aspect buckets" in out.output, out.output
    assert not (tmp_path / "out").exists()


def test_buckets_incremental_and_identity(tiny_model, mixed_data, bucket_store, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(mixed_data, data)
    path = tmp_path / "latents.zarr"
    shutil.copytree(bucket_store, path)
    kw = dict(pretrained_model_name_or_path=str(tiny_model), train_data_dir=str(data), output_dir=str(path),
              center_crop=True, random_flip=True)
    assert run(PrecomputeConfig(**kw, **BUCKETS))["encoded"] == 0
    # A square image turned wide moves from the 32x32 bucket to 40x24, and is encoded once.
    name = json.loads((data / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
    render_aspect("red", "circle", np.random.default_rng(0), 32, 2.0).save(data / name)
    result = run(PrecomputeConfig(**kw, **BUCKETS))
    assert result["encoded"] == 1 and result["num_samples"] == 36
    assert counts(path) == {(24, 40): 12, (32, 32): 11, (40, 24): 13}
    # Bucket settings are part of the store's identity, both ways.
    with pytest.raises(StoreError, match="aspect_buckets True -> False"):
        run(PrecomputeConfig(**kw, resolution=32))
    with pytest.raises(StoreError, match="bucket_step 8 -> 16"):
        run(PrecomputeConfig(**kw, **{**BUCKETS, "bucket_step": 16}))
    assert run(PrecomputeConfig(**kw, resolution=32, overwrite=True))["encoded"] == 36
    assert not LatentStore.open(path).bucketed
    with pytest.raises(StoreError, match="aspect_buckets False -> True"):
        run(PrecomputeConfig(**kw, **BUCKETS))
    with pytest.raises(ValueError, match="--num_shards"):
        PrecomputeConfig(**kw, **BUCKETS, num_shards=2)


def test_infer_any_multiple_of_8(tmp_path):
    """A bucket's size at inference: with a VAE and a UNet that each downsample 4x, 24x40 px are 6x10 latents, which
    the UNet's 4x does not divide (its up blocks then take the skip connections' sizes)."""
    from t2i.infer import InferConfig
    from t2i.infer import run as infer
    from t2i.tiny import TinyGeometry, build_tiny_model

    model = build_tiny_model(tmp_path / "model", TinyGeometry(unet_channels=(32, 32, 64), vae_channels=(32, 32, 64)))
    [path] = infer(InferConfig(prompt=("a red circle",), model=str(model), num_inference_steps=1, height=24, width=40,
                               output=str(tmp_path / "out")))
    assert Image.open(path).size == (40, 24)
    with pytest.raises(ValueError, match="--height must be a positive multiple of 8"):
        InferConfig(prompt=("a",), height=28)
