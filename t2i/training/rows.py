"""Which store rows training sees, in which order, and which stored view of each.

Everything here is a pure function of (seed, epoch) or of the draws passed in, so a resumed run, or a run on more
workers, sees the same samples in the same order.
"""

import numpy as np


def split_holdout(slots, n, seed):
    """(train slots, held-out validation slots): a seeded choice of n slots is kept out of training."""
    if n == 0:
        return slots, slots[:0]
    chosen = np.random.default_rng([seed, 7]).permutation(len(slots))[:n]
    mask = np.zeros(len(slots), bool)
    mask[chosen] = True
    return slots[~mask], np.sort(slots[mask])


def epoch_batches(bucket_slots, global_batch: int, seed: int, epoch: int) -> list:
    """The optimizer steps of one epoch: [(bucket number, global_batch slots of that bucket)], a pure function of
    (seed, epoch). Each bucket's slots (t2i/buckets.py; a store without buckets is one) are permuted and cut into whole
    batches (the rest waits for another epoch, a different rest each time), then the batches of all buckets are
    shuffled together, so every batch is of one latent shape and the buckets take turns at random.

    A full permutation rather than a chunk-local one: a store is filled in dataset order, so a shuffle within windows
    of neighbouring rows trains on one class at a time when the dataset is sorted by class. Reading random rows costs
    about what consecutive rows cost because every store row is an inner chunk of its own (see t2i/store.py). With one
    bucket the batches are default_rng([seed, epoch]).permutation(slots) cut in order, the order of t2i before buckets.
    """
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for b, slots in enumerate(bucket_slots):
        order = rng.permutation(slots)
        batches += [(b, order[i * global_batch : (i + 1) * global_batch]) for i in range(len(slots) // global_batch)]
    if len(bucket_slots) > 1:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def pick_views(u, num_views):
    """The stored view each sample trains on, uniform over the num_views views, from uniform draws u in [0, 1).

    floor(u * V) is at most V - 1 for every float64 u < 1, so no clipping is needed. With one crop and flips (V = 2)
    this is the seed's flip with p = 0.5; with N crops, one of the N crops (and of its flip) per sample and step.
    """
    return np.floor(np.asarray(u) * num_views).astype(np.int64)
