"""Aspect buckets as training sees them: one space of slots over the bucket stores (`Buckets`), each optimizer step
one bucket's batch (`StepBatches`, in the order of t2i.training.rows.epoch_batches), and the compiled step's one
compile per bucket shape (`CompileLog`). Precompute's side (which bucket a sample is encoded at) is
t2i/data/buckets.py."""

from dataclasses import dataclass, field

import numpy as np

from t2i.data.store import InMemory
from t2i.training.rows import epoch_batches


@dataclass
class Buckets:
    """A store's buckets as training sees them: one slot number space over all of them, global slot = the offset of
    its bucket + its slot there. A store without buckets is one bucket at offset 0 (global slot = slot)."""

    sizes: list  # (width, height) per bucket
    stores: list  # t2i.data.store.LatentStore per bucket
    offsets: np.ndarray
    latent_shapes: list
    readers: list | None = None  # per bucket, what `read` reads from: its store, or t2i.data.store.InMemory of it

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
