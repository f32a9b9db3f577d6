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


def epoch_order(slots, seed, epoch):
    """The training slots of one epoch: a full random permutation, fresh for every (seed, epoch).

    Full rather than chunk-local: a store is filled in dataset order, so a shuffle within windows of neighbouring rows
    trains on one class at a time when the dataset is sorted by class. Reading random rows costs about what
    consecutive rows cost because every store row is an inner chunk of its own (see t2i/store.py).
    """
    return np.random.default_rng([seed, epoch]).permutation(slots)


def pick_views(u, num_views):
    """The stored view each sample trains on, uniform over the num_views views, from uniform draws u in [0, 1).

    floor(u * V) is at most V - 1 for every float64 u < 1, so no clipping is needed. With one crop and flips (V = 2)
    this is the seed's flip with p = 0.5; with N crops, one of the N crops (and of its flip) per sample and step.
    """
    return np.floor(np.asarray(u) * num_views).astype(np.int64)
