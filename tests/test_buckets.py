import json
import random

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import BUCKETS, write_subset
from PIL import Image

from t2i import precompute, train
from t2i.data.buckets import bucket_sizes, merge_small, nearest_bucket
from t2i.data.images import crops
from t2i.data.store import LatentStore, StoreError
from t2i.demo.shapes import render_aspect
from t2i.precompute import PrecomputeConfig, run
from t2i.train import TrainConfig
from t2i.training.buckets import Buckets, StepBatches
from t2i.training.rows import epoch_batches
from t2i.training.runlog import read_log


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
    # One bucket: the order of t2i before buckets (checkpoints made then resume on the same batches), pinned.
    single = epoch_batches([np.arange(12)], 4, seed=5, epoch=0)
    np.testing.assert_array_equal(np.concatenate([s for _, s in single]),
                                  np.random.default_rng([5, 0]).permutation(12))


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


def test_buckets_in_memory_read_what_the_store_holds(bucket_store):
    """Held in RAM, every bucket reads the same rows, in the asked order, as from its zarr arrays."""
    buckets = Buckets.of(LatentStore.open(bucket_store))
    rng = np.random.default_rng(0)
    per_bucket = [rng.permutation(part) for part in buckets.split(buckets.valid_slots())]
    from_disk = [buckets.read(b, slots) for b, slots in enumerate(per_bucket)]
    buckets.hold_in_memory()
    assert buckets.nbytes == sum(a.nbytes for reader in buckets.readers for a in reader.arrays.values())
    for b, slots in enumerate(per_bucket):
        for want, got in zip(from_disk[b].arrays(), buckets.read(b, slots).arrays(), strict=True):
            np.testing.assert_array_equal(got, want)


def test_merge_small():
    tall, square, wide = (24, 40), (32, 32), (40, 24)
    assert merge_small({tall: 12, square: 12, wide: 3}, 4) == {tall: tall, square: square, wide: square}
    assert merge_small({tall: 12, square: 12, wide: 3}, 1) == {tall: tall, square: square, wide: wide}
    # Smallest first, and a merged bucket's samples follow when their new bucket is merged in turn.
    assert merge_small({tall: 2, square: 1, wide: 9}, 4) == {tall: wide, square: wide, wide: wide}
    # Equally near: into the fuller one. Never below one bucket, however few samples.
    assert merge_small({tall: 5, square: 2, wide: 6}, 4)[square] == wide
    assert merge_small({tall: 1, wide: 1}, 4) == {tall: wide, wide: wide}
    assert merge_small({tall: 0, square: 5}, 4) == {square: square}


@pytest.fixture(scope="module")
def merged_store(tmp_path_factory, tiny_model, mixed_data):
    """Every square and tall image and 3 of the 12 wide ones, with --min_bucket_size 4: the wide bucket merged into
    the square one. Returns (store, its data folder, the 3 wide images' rows, the 9 left out)."""
    rows = [json.loads(line) for line in (mixed_data / "metadata.jsonl").read_text().splitlines()]
    # make_demo_data's rounds of the 12 classes: square, wide (2:1), tall (1:2).
    base = tmp_path_factory.mktemp("merged")
    data = write_subset(mixed_data, rows[:15] + rows[24:], base / "data")
    path = base / "latents.zarr"
    result = run(PrecomputeConfig(pretrained_model_name_or_path=str(tiny_model), train_data_dir=str(data),
                                  output_dir=str(path), center_crop=True, min_bucket_size=4, **BUCKETS))
    assert result["encoded"] == 27
    return path, data, rows[12:15], rows[15:24]


def test_small_bucket_merged_into_nearest(tiny_model, mixed_data, merged_store, tmp_path):
    import shutil

    store, data, wide, left_out = merged_store
    assert counts(store) == {(24, 40): 12, (32, 32): 15}
    square = LatentStore.open(store).part((32, 32))
    assert {r["file_name"] for r in wide} <= set(square["sample_id"][:].tolist())
    path = tmp_path / "latents.zarr"
    shutil.copytree(store, path)
    kw = dict(pretrained_model_name_or_path=str(tiny_model), output_dir=str(path), center_crop=True,
              min_bucket_size=4, **BUCKETS)
    assert run(PrecomputeConfig(train_data_dir=str(data), **kw))["encoded"] == 0
    # With the other 9 wide images the wide bucket is big enough: the 3 merged ones move back to it (the store
    # remembers their own bucket without decoding them), as a fresh run would place them.
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    full = write_subset(mixed_data, rows + left_out, tmp_path / "full")
    assert run(PrecomputeConfig(train_data_dir=str(full), **kw))["encoded"] == 9 + 3
    assert counts(path) == {(24, 40): 12, (32, 32): 12, (40, 24): 12}
    assert run(PrecomputeConfig(train_data_dir=str(full), **kw))["encoded"] == 0
    with pytest.raises(ValueError, match="--min_bucket_size must be at least 1"):
        PrecomputeConfig(train_data_dir=str(full), **{**kw, "min_bucket_size": 0})


def test_train_reports_and_bounds_buckets(capsys):
    """Buckets too small for a batch are named, with the flag that merges them; more trained buckets than
    --max_buckets is an error."""
    sizes = [(24, 40), (32, 32), (40, 24)]
    buckets = Buckets(sizes=sizes, stores=[None] * 3, offsets=np.array([0, 10, 20]), latent_shapes=[None] * 3)
    batches = StepBatches(buckets, [np.arange(0, 9), np.arange(10, 13), np.arange(20, 28)], 4, seed=0)
    assert batches.steps_per_epoch == 2 + 0 + 2
    batches.check(max_buckets=2, store_name="s.zarr", num_held_out=0)
    out = capsys.readouterr().out
    assert "NOT TRAINED, fewer samples than a batch of 4: 32x32 (3); re-run t2i-precompute with --min_bucket_size 4" \
        in out
    with pytest.raises(ValueError, match="--max_buckets 1: s.zarr has 2 aspect buckets with a batch"):
        batches.check(max_buckets=1, store_name="s.zarr", num_held_out=0)
    with pytest.raises(ValueError, match="= 12 exceeds the 9 training samples in s.zarr .its largest aspect bucket."):
        StepBatches(buckets, batches.bucket_slots, 12, seed=0).check(16, "s.zarr", 3)


def config(model, store, out, **kw):
    base = dict(pretrained_model_name_or_path=str(model), latent_store=str(store), output_dir=str(out),
                train_batch_size=4, max_train_steps=4, checkpointing_steps=2, report_to="none",
                num_validation_samples=3, lr_scheduler="constant", learning_rate=1e-3, jit=False, seed=1)
    return TrainConfig(**{**base, **kw})


def test_train_on_buckets_resumes_exactly(tiny_model, bucket_store, tmp_path, monkeypatch, t2i_home):
    """Every batch is of one bucket, the buckets take turns, and 2 steps + resume == 4 steps straight."""
    from safetensors.numpy import load_file

    shapes = []
    real = train.make_batch

    def record(arrays, *args, **kw):
        shapes.append(arrays.moments.shape)
        return real(arrays, *args, **kw)

    monkeypatch.setattr(train, "make_batch", record)
    full = train.run(config(tiny_model, bucket_store, tmp_path / "full"))
    # 4 samples of one bucket's latents (2 views, 2 x 4 channels, w/2 x h/2) per step; more than one bucket.
    assert len(shapes) == 4 and all(s[:3] == (4, 2, 8) for s in shapes) and len({s[3:] for s in shapes}) > 1
    assert full["val_loss"] is not None and np.isfinite(full["val_loss"])
    # The first half reads the store each step (no memory budget), the straight run and the resume read RAM.
    with monkeypatch.context() as m:
        m.setattr(train, "IN_MEMORY_SHARE", 10**15)
        train.run(config(tiny_model, bucket_store, tmp_path / "split", max_train_steps=2))
    resumed = train.run(config(tiny_model, bucket_store, tmp_path / "split", resume_from_checkpoint="latest"))
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    assert shapes[6:] == shapes[2:4]  # the resumed steps read the same buckets
    # The resumed steps compute exactly what the straight run computed.
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"][2:]]
    unet = "unet/diffusion_pytorch_model.safetensors"
    want, got = load_file(str(tmp_path / "full" / unet)), load_file(str(tmp_path / "split" / unet))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=0, err_msg=k)


def test_compiles_once_per_bucket_shape(tiny_model, merged_store, tmp_path, monkeypatch, t2i_home):
    """--jit on a store of 2 buckets: the step compiles at the first step of each shape and never when a shape comes
    back, and each compile is reported; a store with more trained buckets than --max_buckets is refused in one line
    before anything is written."""
    from mindspore.graph import api

    from t2i.training import step

    events = []
    real_compile, real_build = api._check_recompile, step.build_train_step

    def compiling(*args):  # MindSpore calls it only when it compiles a new graph (a cache miss)
        events.append("compile")
        return real_compile(*args)

    class Recorded:
        """The train step, noting each call's latent shape first: in the training thread, in step order (make_batch
        runs a step ahead on the prefetch thread, so its calls interleave with the compiles in no fixed order)."""

        def __init__(self, *args):
            self.inner = real_build(*args)

        def __call__(self, *inputs):
            events.append(tuple(inputs[0].shape))
            return self.inner(*inputs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(api, "_check_recompile", compiling)
    monkeypatch.setattr(step, "build_train_step", Recorded)
    store = merged_store[0]
    result = train.run(config(tiny_model, store, tmp_path / "o", jit=True, num_validation_samples=0, max_train_steps=6,
                              checkpointing_steps=100))
    steps = [i for i, e in enumerate(events) if e != "compile"] + [len(events)]
    shapes = [events[i] for i in steps[:-1]]
    compiles = [events[a + 1 : b].count("compile") for a, b in zip(steps, steps[1:])]
    # 27 training samples: 3 batches of each bucket in the 6 steps.
    assert len(shapes) == 6 and len(set(shapes)) == 2
    new = [shape not in shapes[:i] for i, shape in enumerate(shapes)]
    assert new.count(True) == 2 and all(n > 0 for n, is_new in zip(compiles, new) if is_new)
    assert all(n == 0 for n, is_new in zip(compiles, new) if not is_new), (shapes, compiles)
    assert sorted(c["bucket"] for c in result["compiles"]) == [[24, 40], [32, 32]]
    log = read_log(tmp_path / "o" / "logs")
    assert [r.get("compiles") for r in log] == [1 + new[:i].count(True) if n else None for i, n in enumerate(new)]
    out = CliRunner().invoke(train.cli, ["--pretrained_model_name_or_path", str(tiny_model), "--latent_store",
                                         str(store), "--output_dir", str(tmp_path / "refused"), "--max_buckets", "1",
                                         "--train_batch_size", "4", "--device_target", "CPU"])
    assert out.exit_code != 0 and "--max_buckets 1: " in out.output, out.output
    assert not (tmp_path / "refused").exists()


def test_infer_any_multiple_of_8(tmp_path):
    """A bucket's size at inference: with a VAE and a UNet that each downsample 4x, 24x40 px are 6x10 latents, which
    the UNet's 4x does not divide (its up blocks then take the skip connections' sizes)."""
    from t2i.demo.tiny import TinyGeometry, build_tiny_model
    from t2i.infer import InferConfig
    from t2i.infer import run as infer

    model = build_tiny_model(tmp_path / "model", TinyGeometry(unet_channels=(32, 32, 64), vae_channels=(32, 32, 64)))
    [path] = infer(InferConfig(prompt=("a red circle",), model=str(model), num_inference_steps=1, height=24, width=40,
                               output=str(tmp_path / "out")))
    assert Image.open(path).size == (40, 24)
    with pytest.raises(ValueError, match="--height must be a positive multiple of 8"):
        InferConfig(prompt=("a",), height=28)
