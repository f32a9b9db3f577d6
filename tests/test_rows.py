import pathlib

import numpy as np
import pytest

from t2i.data.store import LatentStore
from t2i.training.rows import epoch_batches, pick_views, split_holdout


def epoch_order(slots, seed, epoch):
    """An epoch of a store without buckets, batch after batch."""
    return np.concatenate([batch for _, batch in epoch_batches([slots], 1, seed, epoch)])


def store_slots():
    """Valid slots of a store with free rows in it (removed samples), as `LatentStore.valid_slots` gives them."""
    return np.flatnonzero(np.random.default_rng(0).random(64) < 0.8)


def test_epoch_is_a_permutation_of_exactly_the_train_slots():
    slots = store_slots()
    train, held = split_holdout(slots, 6, seed=3)
    assert len(held) == 6 and not np.isin(held, train).any()
    np.testing.assert_array_equal(np.sort(np.concatenate([train, held])), slots)
    orders = [epoch_order(train, 3, epoch) for epoch in range(5)]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.sort(train))
        assert not np.isin(order, held).any()
    assert all(not np.array_equal(a, b) for i, a in enumerate(orders) for b in orders[i + 1 :])
    # A pure function of (seed, epoch): a resumed run sees the same order.
    np.testing.assert_array_equal(epoch_order(train, 3, 2), orders[2])
    assert not np.array_equal(epoch_order(train, 4, 2), orders[2])


def test_batches_mix_classes_on_a_class_sorted_store():
    """A store filled from a dataset sorted by class: 12 classes x 64 consecutive rows, batches of 8.

    A full permutation puts ~6 classes in a batch of 8 and all 12 in the first 12 batches. The previous order
    (chunks of 32 rows in random order, shuffled within windows of 4 chunks) gave 3.5 per batch and at most 4 classes
    in the first 16 batches: it trained on a few classes at a time.
    """
    slots = np.arange(12 * 64)
    label = slots // 64
    for seed in range(3):
        for epoch in range(2):
            batches = np.array([batch for _, batch in epoch_batches([slots], 8, seed, epoch)])
            assert np.mean([len(set(label[b])) for b in batches]) > 4
            assert len(set(label[batches[:12].ravel()])) >= 10


def test_pick_views_is_uniform_over_the_stored_views():
    u = np.random.default_rng(0).random(60000)
    for num_views in (1, 2, 3, 6):
        views = pick_views(u, num_views)
        counts = np.bincount(views, minlength=num_views)
        assert len(counts) == num_views
        # Binomial spread at n = 60000: 5% of the expected count is more than 5 standard deviations.
        np.testing.assert_allclose(counts, len(u) / num_views, rtol=0.05)
    # One crop with flips: the seed's coin flip with p = 0.5.
    np.testing.assert_array_equal(pick_views(u, 2), u >= 0.5)
    below_one = np.nextafter(1.0, 0.0)
    for num_views in range(1, 65):
        assert pick_views([0.0, below_one], num_views).tolist() == [0, num_views - 1]


def make_store(root, num_slots, chunk_rows=4):
    """A store with 2 crops and flips (4 views), 2 caption rows, `chunk_rows` rows per shard file."""
    store = LatentStore.create(root, {}, num_crops=2, random_flip=True, moment_shape=(8, 4, 4), text_shape=(7, 5),
                               max_captions=1, chunk_rows=chunk_rows, dtype="float16")
    store.resize(num_slots, 2)
    return store


def random_rows(rng, n):
    return (rng.standard_normal((n, 4, 8, 4, 4)).astype(np.float16), rng.standard_normal((n, 2, 7, 5)).astype(
        np.float16), rng.integers(1, 3, n).astype(np.int32))


def test_read_returns_exactly_the_rows_written_in_the_order_asked(tmp_path):
    rng = np.random.default_rng(0)
    store = make_store(tmp_path / "store", 30)
    moments, text, counts = random_rows(rng, 30)
    # Written in three scattered parts, so most shard files are written more than once and with gaps.
    for part in np.array_split(rng.permutation(30), 3):
        store.write("moments", part, moments[part])
        store.write("text_states", part, text[part])
        store.write("num_captions", part, counts[part])
    # 8 shard files of 4 rows hold the 30 rows of moments; every row is an inner chunk of its own.
    assert store["moments"].shards[0] == 4 and store["moments"].chunks[0] == 1
    assert len(list((tmp_path / "store" / "moments" / "c").iterdir())) == 8
    reopened = LatentStore.open(tmp_path / "store")
    for slots in (rng.permutation(30)[:11], np.arange(5, 13), np.arange(30)[::-1], [17], [3, 3, 29]):
        got = reopened.read(slots)
        # The very bytes written come back: exact comparison.
        for array, want in zip(got.arrays(), (moments, text, counts), strict=True):
            np.testing.assert_array_equal(array, want[slots])
    assert [len(a) for a in reopened.read([]).arrays()] == [0, 0, 0]


def test_resize_keeps_rows_and_adds_empty_ones(tmp_path):
    rng = np.random.default_rng(1)
    store = LatentStore.create(tmp_path / "store", {}, num_crops=1, random_flip=False, moment_shape=(8, 4, 4),
                               text_shape=(7, 5), max_captions=1, chunk_rows=4, dtype="float16")
    store.resize(6, 1)
    moments = rng.standard_normal((6, 1, 8, 4, 4)).astype(np.float16)
    store.write("moments", np.arange(6), moments)
    # The last shard file (rows 4..7) is half used; growing the store must neither lose nor invent rows.
    store.resize(10, 3)
    assert store["moments"].shape[0] == 10 and store["text_states"].shape[1] == 3
    rows = store.read(np.arange(10))
    got, text = rows.moments, rows.text
    np.testing.assert_array_equal(got[:6], moments)
    assert not got[6:].any() and not text.any()
    store.write("moments", [7], moments[:1])
    np.testing.assert_array_equal(store.read(np.arange(8)).moments, np.concatenate([moments, np.zeros_like(moments[:1]),
                                                                                moments[:1]]))


def test_writing_rows_into_a_shard_file_is_all_or_nothing(tmp_path, monkeypatch):
    """A shard file holds 4 rows; rewriting one of them rewrites the file through a temp file and a rename (zarr's
    LocalStore), so a write that dies before the rename leaves every row of the file as it was."""
    rng = np.random.default_rng(2)
    store = make_store(tmp_path / "store", 8)
    moments, _, _ = random_rows(rng, 8)
    store.write("moments", np.arange(8), moments)
    new, _, _ = random_rows(rng, 2)
    store.write("moments", [1, 6], new)
    moments[[1, 6]] = new
    np.testing.assert_array_equal(store.read(np.arange(8)).moments, moments)

    def rename_fails(self, target):
        raise OSError("killed before the rename")

    monkeypatch.setattr(pathlib.Path, "replace", rename_fails)
    with pytest.raises(OSError, match="killed before the rename"):
        store.write("moments", [2], random_rows(rng, 1)[0])
    monkeypatch.undo()
    np.testing.assert_array_equal(LatentStore.open(tmp_path / "store").read(np.arange(8)).moments, moments)
