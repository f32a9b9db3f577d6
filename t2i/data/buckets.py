"""Aspect-ratio buckets (kohya-style): sizes of about resolution² pixels, each sample encoded at the bucket nearest its
aspect ratio into that bucket's own store (t2i/data/store.py, `LatentStore.part`).

Every bucket is a store of the usual schema, so the slot planning and encoding of t2i/data/encode.py run once per
bucket: a sample whose image changed shape, or whose bucket is merged into another (--min_bucket_size) or no longer is, moves
bucket by being freed in the old one and encoded into the new one.

Training's side of buckets is t2i/training/buckets.py.
"""

import math

from t2i.data.encode import encode_into, prepare_slots
from t2i.data.images import read_image
from t2i.data.shards import copy_from_shards


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


def merge_small(counts: dict, min_size: int) -> dict:
    """size -> the size its samples are encoded at, for counts = {size: samples whose nearest bucket it is}: while a
    bucket holds fewer than min_size samples (and another bucket holds any), its samples go to the bucket whose aspect
    ratio is nearest (on the log scale of `nearest_bucket`; a tie to the fuller bucket), smallest bucket first. A pure
    function of the counts, so a re-run and a fresh run merge alike."""
    counts = {size: n for size, n in counts.items() if n}
    into = {size: size for size in counts}

    def log_ratio(s):
        return math.log(s[0] / s[1])

    while len(counts) > 1:
        small = [s for s in counts if counts[s] < min_size]
        if not small:
            break
        src = min(small, key=lambda s: (counts[s], abs(log_ratio(s)), s))
        n = counts.pop(src)
        dest = min(counts, key=lambda s: (abs(log_ratio(s) - log_ratio(src)), -counts[s], s))
        counts[dest] += n
        into = {size: dest if target == src else target for size, target in into.items()}
    return into


def assign(store, held, good, sizes, config, skipped, in_shards):
    """(size -> [samples] for the usable samples, {sample_id: its nearest bucket} of the merged ones): buckets of
    fewer than config.min_bucket_size samples are merged into their neighbours (`merge_small`), except in a shard (the
    merge of the shards knows every sample and merges then). An unchanged sample (same content hash, complete; `held`
    is `held_samples(store)`) is not decoded: its nearest bucket is the one that holds it, or the one the store's
    `natural_buckets` attribute records for a merged sample; nor is a sample a shard holds (`in_shards`, which never
    merge). An unreadable sample goes to `skipped`."""
    recorded = store.natural_buckets()
    natural = {}
    for s in good:
        if s.id in held and held[s.id][1] == s.content_hash:
            natural[s.id] = recorded.get(s.id, held[s.id][0])
        elif s.id in in_shards and in_shards[s.id][1] == s.content_hash:
            natural[s.id] = in_shards[s.id][0]
        else:
            try:
                _, img = read_image(s, config.max_image_pixels)
            except ValueError as e:
                skipped.append({"id": s.id, "reason": str(e)})
                continue
            natural[s.id] = nearest_bucket(*img.size, sizes)
    counts = {}
    for size in natural.values():
        counts[size] = counts.get(size, 0) + 1
    into = merge_small(counts, config.min_bucket_size if config.num_shards == 1 else 1)
    merged = {size: target for size, target in into.items() if target != size}
    if merged:
        print(f"aspect buckets of fewer than --min_bucket_size {config.min_bucket_size} samples merged into their "
              "nearest: " + ", ".join(f"{w}x{h} ({counts[w, h]}) -> {t[0]}x{t[1]}" for (w, h), t in merged.items()))
    out = {}
    for s in good:
        if s.id in natural:
            out.setdefault(into[natural[s.id]], []).append(s)
    # Recorded before anything moves, for every sample merged now or before: with it a later run (after a kill, too)
    # knows each sample's nearest bucket without decoding it. encode_buckets keeps only the merged ones at the end.
    store.set_natural_buckets({i: n for i, n in natural.items() if into[n] != n or (i in held and held[i][0] != n)})
    return out, {i: list(n) for i, n in natural.items() if into[n] != n}


def encode_buckets(store, good, skipped, config, encoders, create_part, shards=()) -> dict:
    """Encode the samples into the bucket stores of `store` (create_part(size) makes a missing one), copying each row
    that a shard store of buckets (`--merge_shards`) holds in the same bucket with the same content hash; returns the
    counts of run's summary. A bucket left without samples keeps its (empty) store until a run needs it again."""
    sizes = bucket_sizes(config.resolution, config.bucket_step, config.max_aspect_ratio)
    held = held_samples(store)
    in_shards = {}
    for shard in shards:
        in_shards.update(held_samples(shard))
    by_size, merged = assign(store, held, good, sizes, config, skipped, in_shards)
    existing = {size for size, _ in store.parts()}
    encoded = unchanged = copied = 0
    for size in sizes:
        samples = by_size.get(size, [])
        if size in existing:
            part = store.part(size, mode="r+")
        elif samples:
            part = create_part(size)
            existing.add(size)
            # Listed as soon as it exists, so that a later run (after a kill, too) finds it.
            store.list_buckets([s for s in sizes if s in existing])
        else:
            continue
        todo, _ = prepare_slots(part, samples, skipped)
        done = copy_from_shards(part, todo, [p for p in (shard.part(size) for shard in shards) if p is not None])
        encoded += encode_into(part, [(slot, s) for slot, s in todo if slot not in done], encoders, config, skipped,
                               size)
        copied += len(done)
        unchanged += len(samples) - len(todo)
    store.set_natural_buckets(merged)
    wanted = {s.id for s in good}
    return {"encoded": encoded, "copied": copied, "unchanged": unchanged,
            "removed": len([i for i in held if i not in wanted])}
