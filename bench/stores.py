"""Stores made without encoding, for the memory section, and the time `LatentStore.read` takes for a batch of
random rows vs consecutive rows."""

import shutil
from pathlib import Path

import numpy as np

from bench.timing import interleaved, paired_ratio, summary


def build_scaled_store(src_path, dst_path, factor, seed=0):
    """A store `factor` times larger than src without encoding: src's samples repeated, latent means perturbed.

    Attributes are src's (so the model fingerprint matches) and every slot is marked done, written last.
    """
    from t2i.data.store import LatentStore

    src = LatentStore.open(src_path)
    rows = src.read(src.valid_slots())
    moments, text, counts = rows.moments, rows.text, rows.counts
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
    from t2i.data.store import LatentStore

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
    from t2i.data.store import LatentStore

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
