"""Aspect-ratio buckets (kohya-style): sizes of about resolution² pixels, each sample encoded at the bucket nearest its
aspect ratio into that bucket's own store (t2i/store.py, `LatentStore.part`), and training batches that each come from
one bucket.

Every bucket is a store of the usual schema, so the slot planning and encoding of t2i/encode.py run once per bucket:
a sample whose image changed shape moves bucket by being freed in the old one and encoded into the new one.
"""

import math

import numpy as np

from t2i.encode import encode_into, prepare_slots
from t2i.images import read_image


def bucket_sizes(resolution: int, step: int, max_ratio: float) -> list:
    """(width, height) pairs in multiples of `step` with width x height <= resolution² as large as the step allows,
    long side / short side <= max_ratio; sorted from the tallest to the widest. Always holds the square bucket."""
    area = resolution * resolution
    side = resolution // step * step
    sizes = {(side, side)}
    for short in range(step, side + 1, step):
        long = area // short // step * step
        if long >= short and long / short <= max_ratio:
            sizes |= {(short, long), (long, short)}
    return sorted(sizes, key=lambda s: s[0] / s[1])


def nearest_bucket(width: int, height: int, sizes) -> tuple:
    """The bucket whose aspect ratio is nearest the image's (on a log scale, so 1:2 and 2:1 are as far from 1:1),
    which is the one a resize to it crops least."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda s: abs(math.log(s[0] / s[1]) - ratio))


def held_samples(store) -> dict:
    """sample_id -> (bucket size, content hash) of every complete sample of a store of buckets."""
    held = {}
    for size, part in store.parts():
        for sample_id, (_, h, done) in part.index().items():
            if done:
                held[sample_id] = (size, h)
    return held


def assign(held, good, sizes, max_pixels: int, skipped) -> dict:
    """size -> [samples] for the usable samples. An unchanged sample (same content hash, complete) stays in the bucket
    that holds it, without decoding its image; the others are decoded for their size. An unreadable sample goes to
    `skipped`."""
    out = {}
    for s in good:
        if s.id in held and held[s.id][1] == s.content_hash:
            size = held[s.id][0]
        else:
            try:
                _, img = read_image(s, max_pixels)
            except ValueError as e:
                skipped.append({"id": s.id, "reason": str(e)})
                continue
            size = nearest_bucket(*img.size, sizes)
        out.setdefault(size, []).append(s)
    return out


def encode_buckets(store, good, skipped, config, encoders, create_part) -> dict:
    """Encode the samples into the bucket stores of `store` (create_part(size) makes a missing one); returns the
    counts of run's summary. A bucket left without samples keeps its (empty) store until a run needs it again."""
    sizes = bucket_sizes(config.resolution, config.bucket_step, config.max_aspect_ratio)
    held = held_samples(store)
    by_size = assign(held, good, sizes, config.max_image_pixels, skipped)
    existing = {size for size, _ in store.parts()}
    encoded = unchanged = 0
    for size in sizes:
        samples = by_size.get(size, [])
        if size in existing:
            part = store.part(size, mode="r+")
        elif samples:
            part = create_part(size)
            existing.add(size)
            # Listed as soon as it exists, so that a later run (after a kill, too) finds it.
            store.group.attrs["buckets"] = [list(s) for s in sizes if s in existing]
        else:
            continue
        todo, _ = prepare_slots(part, samples, skipped)
        encoded += encode_into(part, todo, encoders, config, skipped, size)
        unchanged += len(samples) - len(todo)
    wanted = {s.id for s in good}
    return {"encoded": encoded, "unchanged": unchanged, "removed": len([i for i in held if i not in wanted])}


def epoch_batches(bucket_slots, global_batch: int, seed: int, epoch: int) -> list:
    """The optimizer steps of one epoch: [(bucket number, global_batch slots of that bucket)], a pure function of
    (seed, epoch). Each bucket's slots are permuted and cut into whole batches (the rest waits for another epoch, a
    different rest each time), then the batches of all buckets are shuffled together. With one bucket the permutation
    is already the whole shuffle, and is `sampling.epoch_order`'s."""
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for b, slots in enumerate(bucket_slots):
        order = rng.permutation(slots)
        batches += [(b, order[i * global_batch : (i + 1) * global_batch]) for i in range(len(slots) // global_batch)]
    if len(bucket_slots) > 1:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches
