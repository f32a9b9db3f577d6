"""Aspect-ratio buckets (kohya-style): sizes of about resolution² pixels, each sample encoded at the bucket nearest its
aspect ratio into that bucket's own store (t2i/store.py, `LatentStore.part`), and training batches that each come from
one bucket.

Every bucket is a store of the usual schema, so the slot planning and encoding of t2i/encode.py run once per bucket:
a sample whose image changed shape, or whose bucket is merged into another (--min_bucket_size) or no longer is, moves
bucket by being freed in the old one and encoded into the new one.

Training sees the buckets as one space of slots (`Buckets`); each optimizer step trains on one bucket's batch
(`StepBatches`, in the order of t2i.sampling.epoch_batches), and the compiled step compiles once per bucket shape
(`CompileLog`).
"""

import math
from dataclasses import dataclass, field

import numpy as np

from t2i.encode import encode_into, prepare_slots
from t2i.images import read_image
from t2i.sampling import epoch_batches
from t2i.shards import copy_from_shards


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
    recorded = {k: tuple(v) for k, v in store.group.attrs.get("natural_buckets", {}).items()}
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
    store.group.attrs["natural_buckets"] = {i: list(n) for i, n in natural.items()
                                            if into[n] != n or (i in held and held[i][0] != n)}
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
            store.group.attrs["buckets"] = [list(s) for s in sizes if s in existing]
        else:
            continue
        todo, _ = prepare_slots(part, samples, skipped)
        done = copy_from_shards(part, todo, [p for p in (shard.part(size) for shard in shards) if p is not None])
        encoded += encode_into(part, [(slot, s) for slot, s in todo if slot not in done], encoders, config, skipped,
                               size)
        copied += len(done)
        unchanged += len(samples) - len(todo)
    store.group.attrs["natural_buckets"] = merged
    wanted = {s.id for s in good}
    return {"encoded": encoded, "copied": copied, "unchanged": unchanged,
            "removed": len([i for i in held if i not in wanted])}


@dataclass
class Buckets:
    """A store's buckets as training sees them: one slot number space over all of them, global slot = the offset of
    its bucket + its slot there. A store without buckets is one bucket at offset 0 (global slot = slot)."""

    sizes: list  # (width, height) per bucket
    stores: list  # t2i.store.LatentStore per bucket
    offsets: np.ndarray
    latent_shapes: list
    readers: list | None = None  # per bucket, what `read` reads from: its store, or t2i.store.InMemory of it

    @classmethod
    def of(cls, store) -> "Buckets":
        parts = store.parts()
        counts = [part.num_slots for _, part in parts]
        return cls(sizes=[size for size, _ in parts], stores=[part for _, part in parts],
                   offsets=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64),
                   latent_shapes=[tuple(part.attrs["latent_shape"]) for _, part in parts])

    def valid_slots(self) -> np.ndarray:
        return np.concatenate([offset + part.valid_slots() for offset, part in zip(self.offsets, self.stores)])

    def split(self, slots) -> list:
        """The given global slots per bucket, in their order."""
        bucket = np.searchsorted(self.offsets, slots, side="right") - 1
        return [np.asarray(slots)[bucket == b] for b in range(len(self.stores))]

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.stores)

    def hold_in_memory(self):
        """Read every bucket into RAM once; `read` then indexes NumPy arrays instead of reading zarr chunks."""
        from t2i.store import InMemory

        self.readers = [InMemory(part) for part in self.stores]

    def read(self, b: int, slots):
        """`LatentStore.read` of global slots that all lie in bucket b."""
        return (self.readers or self.stores)[b].read(np.asarray(slots) - self.offsets[b])


@dataclass
class StepBatches:
    """Which bucket and which global slots each optimizer step trains on: `epoch_batches`, a pure function of (seed,
    step), so a resumed run or a run on more workers trains on the same batches."""

    buckets: Buckets
    bucket_slots: list  # the training slots of each bucket
    global_batch: int
    seed: int
    _epoch: tuple = (None, None)  # (epoch, its batches): the last epoch asked for

    @property
    def steps_per_epoch(self) -> int:
        return sum(len(slots) // self.global_batch for slots in self.bucket_slots)

    def at(self, step: int):
        """(bucket number, the step's global batch of slots)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_batches(self.bucket_slots, self.global_batch, self.seed, epoch))
        return self._epoch[1][position]

    def check(self, max_buckets: int, store_name: str, num_held_out: int):
        """Refuse a store with no batch of samples or more trained bucket shapes than --max_buckets (each is one
        compile of the train step); print the samples per bucket and name the buckets too small for a batch."""
        sizes, n = self.buckets.sizes, self.global_batch
        if self.steps_per_epoch == 0:
            largest = max(len(slots) for slots in self.bucket_slots)
            where = f"{store_name}{' (its largest aspect bucket)' if len(sizes) > 1 else ''}"
            raise ValueError(f"--train_batch_size x --gradient_accumulation_steps x workers = {n} exceeds the "
                             f"{largest} training samples in {where} ({num_held_out} held out by "
                             "--num_validation_samples)")
        if len(sizes) == 1:
            return
        print("aspect buckets (training samples): "
              + ", ".join(f"{w}x{h} {len(slots)}" for (w, h), slots in zip(sizes, self.bucket_slots)))
        small = [f"{w}x{h} ({len(slots)})" for (w, h), slots in zip(sizes, self.bucket_slots) if 0 < len(slots) < n]
        if small:
            print(f"NOT TRAINED, fewer samples than a batch of {n}: {', '.join(small)}; re-run t2i-precompute with "
                  f"--min_bucket_size {n} to merge them into their nearest bucket")
        trained = sum(len(slots) >= n for slots in self.bucket_slots)
        if trained > max_buckets:
            raise ValueError(f"--max_buckets {max_buckets}: {store_name} has {trained} aspect buckets with a batch of "
                             "samples, one compile of the train step each; raise --max_buckets, or re-run "
                             "t2i-precompute with a larger --bucket_step or --min_bucket_size, or a smaller "
                             "--max_aspect_ratio")


@dataclass
class CompileLog:
    """With --jit, the first step of every latent shape: ms.jit compiles the step once per input shape and keeps every
    graph, so that step's time is mostly its compile, and a later step of a shape already seen compiles nothing."""

    jit: bool
    compiles: list = field(default_factory=list)  # {"bucket": [w, h], "latent_shape": [...], "first_step_s": s}

    def is_new(self, latent_shape) -> bool:
        return self.jit and list(latent_shape) not in [c["latent_shape"] for c in self.compiles]

    def note(self, size, latent_shape, seconds: float, echo: bool) -> dict:
        """Record the first step of a new shape; returns what the step's log line gets."""
        self.compiles.append({"bucket": list(size), "latent_shape": list(latent_shape), "first_step_s": seconds})
        if echo:
            print(f"\ncompile {len(self.compiles)}: bucket {size[0]}x{size[1]} (latents "
                  f"{'x'.join(map(str, latent_shape))}), first step {seconds:.1f} s; "
                  f"{sum(c['first_step_s'] for c in self.compiles):.1f} s for {len(self.compiles)} compiles")
        return {"compiles": len(self.compiles), "compile_s": seconds}
