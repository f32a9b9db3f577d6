"""The zarr latent store: the contract between precompute (writer) and train (reader).

Layout (zarr v3 group), one row ("slot") per sample:
  moments       (S, V, 2C, h, w)  VAE posterior mean ‖ logvar of V views: view = crop * F + flipped, F = 2 when flips
                                  are stored (flipped 1 = the mirrored crop) else 1, crop in 0..num_crops-1
  text_states   (S, K, L, D)      CLIP last hidden state of up to K captions per sample
  num_captions  (S,)  int32       how many of the K caption rows are real
  crop          (S, N, 2) int32   top-left of each of the N = num_crops crops taken from the resized image
  pooled        (S, K, P)         SDXL only: the second text encoder's pooled projection of each caption
  time_ids      (S, V, 6) int32   SDXL only: each view's size conditioning, original (h, w), crop top-left (y, x) in
                                  the resized (and for a flipped view, mirrored) image, target (h, w)
  sample_id     (S,)  str         the source id (file_name for an imagefolder), "" for a free slot
  content_hash  (S,)  str         sha256 of image bytes + captions; decides re-encoding
  done          (S,)  bool        written last: a slot counts only once all its data is in

`moments` and `text_states` use zarr's sharding codec: a shard file on disk holds `chunk_rows` rows, and inside it
every row (every row and caption, for text_states) is an inner chunk of its own, compressed on its own and located by
the shard file's index. Reading one row therefore reads the index and that row's bytes, not its neighbours', so a
batch of random rows (what a full per-epoch shuffle asks for) costs about what a batch of consecutive rows costs
(`make bench` times both). The small per-row arrays are plain chunked arrays of 4096 rows.

Attributes describe the store (see `describe`); `vae_scaling_factor` is read by train from here and nowhere else.
Schema versions: 2 is the SD 1.x/2.x store; 3 adds `family: "sdxl"`, `pooled` and `time_ids`. An SD store is still
written as version 2, so the stores of earlier t2i keep working and keep being updated.

Crash safety. zarr's LocalStore writes every file, chunk or shard file, as a temp file `*.partial` + rename (zarr
3.1: storage/_local.py, `_atomic_write`), and writing a few rows into an existing shard file reads the whole shard
file, merges the new inner chunks and writes the whole file again that way (codecs/sharding.py,
`_encode_partial_single`); nothing is written in place. A kill leaves each file old or new, and a slot's `done` flag
is written after its data, so a run killed at any point leaves a store whose done slots are complete (precompute
deletes the `*.partial` files a kill leaves behind). One process writes a store at a time: two writers of rows of one
shard file would each rewrite it and lose the other's rows (hence precompute's one store per --shard_id).
"""

import asyncio
import dataclasses
import datetime
from pathlib import Path

import numpy as np
import zarr

# zarr's own event-loop runner, which every synchronous zarr call goes through: one call of it sends many reads at once.
from zarr.core.sync import sync

from t2i import __version__

SCHEMA_VERSION = 2  # an SD 1.x/2.x store
SDXL_SCHEMA_VERSION = 3  # a store with pooled text embeddings and size conditioning
SCHEMA_VERSIONS = (SCHEMA_VERSION, SDXL_SCHEMA_VERSION)
STORE_DTYPES = {"fp16": "float16", "fp32": "float32"}
SMALL_CHUNK = 4096


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoreIdentity:
    """The attributes that make two stores incompatible: changing any of them means every latent must be re-encoded."""

    schema_version: int = SCHEMA_VERSION
    model_fingerprint: str
    resolution: int
    center_crop: bool
    random_flip: bool
    num_crops: int
    store_dtype: str
    # Aspect buckets (t2i/buckets.py); a store made before them has none of these attributes, i.e. no buckets.
    aspect_buckets: bool = False
    bucket_step: int | None = None
    max_aspect_ratio: float | None = None

    def attrs(self) -> dict:
        return dataclasses.asdict(self)

    def mismatch(self, attrs: dict, arrow: str = "->") -> str:
        """What differs between a store's attributes and this identity, as "key old -> new, ..."; "" when nothing."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        old = {k: attrs.get(k, defaults.get(k)) for k in self.attrs()}
        return ", ".join(f"{k} {old[k]!r} {arrow} {v!r}" for k, v in self.attrs().items() if old[k] != v)


class StoreError(ValueError):
    pass


def bucket_group(size) -> str:
    """The subgroup of the aspect bucket size = (width, height)."""
    return f"bucket_{size[0]}x{size[1]}"


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def num_views(num_crops: int, random_flip: bool) -> int:
    return num_crops * (2 if random_flip else 1)


def _runs(sorted_slots):
    """(start, stop) of each run of consecutive slots in a sorted array; a repeated slot starts a run of its own."""
    breaks = np.flatnonzero(np.diff(sorted_slots) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(sorted_slots, breaks)]


async def _read_runs(arr: zarr.AsyncArray, runs):
    return await asyncio.gather(*(arr.getitem(slice(start, stop)) for start, stop in runs))


async def _write_file(arr: zarr.AsyncArray, start, stop, rows, values):
    """values into rows (absolute, sorted, all within [start, stop) of one shard file or chunk): one slice write,
    merged into the rows already there when the rows leave gaps."""
    if len(rows) < stop - start:
        block = await arr.getitem(slice(start, stop))
        block[rows - start] = values
        values = block
    await arr.setitem(slice(start, stop), values)


async def _write_files(arr: zarr.AsyncArray, groups):
    await asyncio.gather(*(_write_file(arr, *group) for group in groups))


@dataclasses.dataclass
class Rows:
    """Store rows as read for training: per sample its views' VAE moments (V, 2C, h, w), its captions' text states
    (K, L, D) and how many of the K captions are real; for SDXL the captions' pooled embeddings (K, P) and the views'
    size conditioning (V, 6)."""

    moments: np.ndarray
    text: np.ndarray
    counts: np.ndarray
    pooled: np.ndarray | None = None
    time_ids: np.ndarray | None = None

    def arrays(self) -> tuple:
        """The arrays held, in field order (LatentStore.row_arrays' order)."""
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return tuple(v for v in values if v is not None)


class InMemory:
    """A store part's moments, text states and caption counts held in RAM, read by indexing: what `LatentStore.read`
    returns, without a zarr read per step (kohya's --cache_latents keeps latents in memory the same way)."""

    def __init__(self, store: "LatentStore"):
        self.arrays = {name: store.group[name][:] for name in store.row_arrays()}

    def read(self, slots):
        slots = np.asarray(slots, np.int64)
        return Rows(*(array[slots] for array in self.arrays.values()))


class LatentStore:
    def __init__(self, root, group: zarr.Group):
        self.root = Path(root)
        self.group = group

    @classmethod
    def exists(cls, root) -> bool:
        return (Path(root) / "zarr.json").is_file()

    @classmethod
    def open(cls, root, mode="r", flag="--latent_store"):
        """Open an existing store; `flag` names the command-line option the path came from, for error messages."""
        root = Path(root)
        if not cls.exists(root):
            raise StoreError(f"{flag}: {root} is not a t2i latent store (no zarr.json); run t2i-precompute first")
        group = zarr.open_group(str(root), mode=mode)
        version = group.attrs.get("schema_version")
        if version not in SCHEMA_VERSIONS:
            raise StoreError(
                f"{root}: store schema version {version}, this t2i reads {' and '.join(map(str, SCHEMA_VERSIONS))}; "
                "re-run t2i-precompute with --overwrite"
            )
        return cls(root, group)

    @classmethod
    def create(cls, root, attrs, *, num_crops, random_flip, moment_shape, text_shape, max_captions, chunk_rows,
               dtype, pooled_dim=None):
        """A new empty store (0 slots); chunk_rows is the number of rows per shard file of moments and text_states.
        pooled_dim: an SDXL store (schema 3), with pooled embeddings of that width and size conditioning."""
        group = zarr.open_group(str(root), mode="w")
        views = num_views(num_crops, random_flip)
        c2, h, w = moment_shape
        length, dim = text_shape
        group.create_array("moments", shape=(0, views, c2, h, w), chunks=(1, views, c2, h, w),
                           shards=(chunk_rows, views, c2, h, w), dtype=dtype)
        # One caption per inner chunk and shard file column, so that growing K adds files rather than rewriting any.
        group.create_array("text_states", shape=(0, max_captions, length, dim), chunks=(1, 1, length, dim),
                           shards=(chunk_rows, 1, length, dim), dtype=dtype)
        group.create_array("num_captions", shape=(0,), chunks=(SMALL_CHUNK,), dtype="int32")
        group.create_array("crop", shape=(0, num_crops, 2), chunks=(SMALL_CHUNK, num_crops, 2), dtype="int32")
        group.create_array("sample_id", shape=(0,), chunks=(SMALL_CHUNK,), dtype=str)
        group.create_array("content_hash", shape=(0,), chunks=(SMALL_CHUNK,), dtype=str)
        group.create_array("done", shape=(0,), chunks=(SMALL_CHUNK,), dtype=bool)
        if pooled_dim:
            group.create_array("pooled", shape=(0, max_captions, pooled_dim), chunks=(1, 1, pooled_dim),
                               shards=(chunk_rows, 1, pooled_dim), dtype=dtype)
            group.create_array("time_ids", shape=(0, views, 6), chunks=(SMALL_CHUNK, views, 6), dtype="int32")
        flip = "flipped 1 = the mirrored crop" if random_flip else "no flips stored"
        group.attrs.update({**attrs, "num_crops": num_crops, "random_flip": random_flip,
                            "views": f"view = crop * {2 if random_flip else 1} + flipped ({flip}); {views} views",
                            **cls._version(pooled_dim), "tool_version": __version__, "created": now()})
        return cls(root, group)

    @staticmethod
    def _version(sdxl) -> dict:
        return {"schema_version": SDXL_SCHEMA_VERSION, "family": "sdxl"} if sdxl else {"schema_version": SCHEMA_VERSION}

    @classmethod
    def create_bucketed(cls, root, attrs, sdxl=False):
        """A new store of aspect buckets: attributes only, each bucket a store of its own in a subgroup (`part`)."""
        group = zarr.open_group(str(root), mode="w")
        group.attrs.update({**attrs, "buckets": [], **cls._version(sdxl), "tool_version": __version__,
                            "created": now()})
        return cls(root, group)

    @property
    def sdxl(self) -> bool:
        return self.group.attrs.get("family") == "sdxl"

    def caption_arrays(self) -> tuple:
        """The per-sample arrays with a caption axis (K): it widens when a sample gains captions."""
        return ("text_states", "pooled") if self.sdxl else ("text_states",)

    def row_arrays(self) -> tuple:
        """The per-sample arrays training reads, in Rows' field order."""
        return ("moments", "text_states", "num_captions") + (("pooled", "time_ids") if self.sdxl else ())

    @property
    def bucketed(self) -> bool:
        return "buckets" in self.group.attrs

    def part(self, size, mode="r"):
        """The store of the aspect bucket size = (width, height), None when it has none yet."""
        path = self.root / bucket_group(size)
        return LatentStore.open(path, mode=mode) if LatentStore.exists(path) else None

    def parts(self) -> list:
        """[((width, height), store)] of every bucket (the bucket list in the attributes, in that order); a store
        without buckets is one part of resolution x resolution."""
        if not self.bucketed:
            res = self.group.attrs["resolution"]
            return [((res, res), self)]
        return [((w, h), self.part((w, h))) for w, h in self.group.attrs["buckets"]]

    def num_complete(self) -> int:
        return sum(len(part.valid_slots()) for _, part in self.parts())

    def __getitem__(self, name):
        return self.group[name]

    @property
    def attrs(self):
        return dict(self.group.attrs)

    @property
    def num_slots(self) -> int:
        return self.group["done"].shape[0]

    @property
    def scaling_factor(self) -> float:
        return float(self.group.attrs["vae_scaling_factor"])

    @property
    def chunk_rows(self) -> int:
        """Rows per shard file of moments and text_states (precompute's --chunk_rows); zarr's chunks are 1 row."""
        return self.group["moments"].shards[0]

    def valid_slots(self) -> np.ndarray:
        """Slots whose data is complete, in slot order."""
        if self.num_slots == 0:
            return np.zeros(0, np.int64)
        return np.flatnonzero(self.group["done"][:])

    def index(self) -> dict:
        """sample_id -> (slot, content_hash, done) for every slot that holds a sample."""
        if self.num_slots == 0:
            return {}
        ids, hashes, done = self.group["sample_id"][:], self.group["content_hash"][:], self.group["done"][:]
        return {str(i): (slot, str(h), bool(d)) for slot, (i, h, d) in enumerate(zip(ids, hashes, done)) if i}

    def resize(self, num_slots: int, max_captions: int):
        per_view = ("time_ids",) if self.sdxl else ()
        for name in ("moments", "num_captions", "crop", "sample_id", "content_hash", "done") + per_view:
            arr = self.group[name]
            arr.resize((num_slots,) + arr.shape[1:])
        for name in self.caption_arrays():
            arr = self.group[name]
            arr.resize((num_slots, max(max_captions, arr.shape[1])) + arr.shape[2:])

    @property
    def nbytes(self) -> int:
        """Bytes the per-sample arrays take decompressed in memory."""
        return sum(self.group[name].nbytes for name in self.row_arrays())

    def read(self, slots) -> Rows:
        """The `row_arrays` (moments, text_states, num_captions; SDXL's pooled and time_ids) of the given slots, in
        the given order, as NumPy.

        Each run of consecutive slots is one slice read and all runs of all three arrays go to zarr at once, so
        random slots cost one small inner-chunk read each, done concurrently. Not zarr's orthogonal selection: in zarr
        3.1, on a sharded array of more than two dimensions it turns the selection into one coordinate per element
        inside each shard (3-4x slower here; zarr-developers/zarr-python#2834).
        """
        arrays = [self.group[name] for name in self.row_arrays()]
        slots = np.asarray(slots, np.int64)
        if len(slots) == 0:
            return Rows(*(arr[:0] for arr in arrays))
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        runs = _runs(sorted_slots)

        async def read_one(arr):
            if arr.shards is not None:
                return np.concatenate(await _read_runs(arr.async_array, runs))
            # A small array in one orthogonal read (zarr's fast path, not sharded): its rows share chunks of 4096.
            return await arr.async_array.get_orthogonal_selection((sorted_slots,) + (slice(None),) * (arr.ndim - 1))

        async def read_all():
            return await asyncio.gather(*(read_one(arr) for arr in arrays))

        out = []
        for sorted_rows in sync(read_all()):
            rows = np.empty_like(sorted_rows)
            rows[order] = sorted_rows
            out.append(rows)
        return Rows(*out)

    def write(self, name: str, slots, values):
        """values[i] into row slots[i] of array `name` (slots unique): one slice write per touched shard file (chunk,
        for the small arrays), all sent to zarr at once; a shard file the slots leave gaps in keeps its other rows.

        Slices because zarr 3.1's orthogonal write fails on sharded arrays of more than two dimensions
        (zarr-developers/zarr-python#2834).
        """
        if len(slots) == 0:
            return
        slots = np.asarray(slots, np.int64)
        order = np.argsort(slots)
        slots, values = slots[order], np.asarray(values)[order]
        arr = self.group[name]
        rows_per_file = (arr.shards or arr.chunks)[0]
        breaks = np.flatnonzero(np.diff(slots // rows_per_file)) + 1
        groups = [(int(rows[0]), int(rows[-1]) + 1, rows, part)
                  for rows, part in zip(np.split(slots, breaks), np.split(values, breaks))]
        sync(_write_files(arr.async_array, groups))

    def write_complete(self, slots, rows: Rows, crops, ids, hashes):
        """Whole rows into the given slots, `done` last: a kill before it leaves the slots to be redone by the next
        run, never counted complete with part of their data."""
        for name, values in zip(self.row_arrays(), rows.arrays()):
            self.write(name, slots, values)
        self.write("crop", slots, crops)
        self.write("sample_id", slots, np.array(ids, dtype=object))
        self.write("content_hash", slots, np.array(hashes, dtype=object))
        self.write("done", slots, np.ones(len(slots), bool))

    def note_update(self, skipped, num_samples=None):
        """Record when the store was last written and the inputs skipped (and, at the end of a run, how many samples
        are complete)."""
        extra = {} if num_samples is None else {"num_samples": num_samples}
        self.group.attrs.update({"updated": now(), "skipped": skipped, **extra})

    def list_buckets(self, sizes):
        """The bucket sizes (width, height) this store of buckets holds a store for, in training's order."""
        self.group.attrs["buckets"] = [list(s) for s in sizes]

    def natural_buckets(self) -> dict:
        """sample_id -> the bucket (width, height) nearest its image, recorded for samples encoded at another one
        (merged by --min_bucket_size), so a re-run knows it without decoding the image."""
        return {k: tuple(v) for k, v in self.group.attrs.get("natural_buckets", {}).items()}

    def set_natural_buckets(self, natural: dict):
        self.group.attrs["natural_buckets"] = {k: list(v) for k, v in natural.items()}

    def empty_prompt(self):
        """The text states of the empty prompt, what caption dropout trains on in place of a caption (for SD the
        encoding of "", not a zero vector: the pipeline feeds the UNet that for classifier-free guidance; for SDXL
        zeros where the base's force_zeros_for_empty_prompt says so); None in a store made before t2i kept it."""
        if not self.group.attrs.get("empty_prompt_done"):
            return None
        return self.group["empty_prompt"][:]

    def empty_pooled(self):
        """SDXL: the empty prompt's pooled embedding (P,); None otherwise."""
        return self.group["empty_pooled"][:] if self.sdxl and self.group.attrs.get("empty_prompt_done") else None

    def write_empty_prompt(self, states, pooled=None):
        """Store the empty prompt's text states (L, D) (and SDXL's pooled embedding (P,)); the flag is set last, so a
        kill mid-write leaves none."""
        for name, values in (("empty_prompt", states), ("empty_pooled", pooled)):
            if values is not None:
                arr = self.group.create_array(name, shape=values.shape, dtype=values.dtype, overwrite=True)
                arr[...] = values
        self.group.attrs["empty_prompt_done"] = True

    def describe(self) -> str:
        a = self.attrs
        valid = self.num_complete()
        lines = [f"t2i latent store {self.root}", f"  family: {a.get('family', 'sd')}"]
        for key in (
            "schema_version", "tool_version", "created", "updated", "pretrained_model_name_or_path",
            "model_fingerprint", "vae_scaling_factor", "resolution", "center_crop", "random_flip", "num_crops",
            "views", "store_dtype", "vae_dtype", "text_encoder_dtype", "latent_shape", "text_shape", "aspect_buckets",
            "bucket_step", "max_aspect_ratio",
        ):
            lines.append(f"  {key}: {a.get(key)}")
        parts = [(size, part) for size, part in self.parts() if part is not None]
        lines.append(f"  samples: {valid} complete of {sum(part.num_slots for _, part in parts)} slots")
        if self.bucketed:
            lines.append(f"  aspect buckets: {len(parts)}")
            lines += [f"    {w}x{h}: {len(part.valid_slots())} samples, latents {part.attrs['latent_shape']}, "
                      f"{sum(f.stat().st_size for f in part.root.rglob('*') if f.is_file()) / 1024:.0f} KiB on disk"
                      for (w, h), part in parts]
        captions = max((part["text_states"].shape[1] for _, part in parts), default=0)
        lines.append(f"  captions per sample: up to {captions}")
        lines.append(f"  rows per shard file: {parts[0][1].chunk_rows if parts else None}")
        lines.append(f"  empty-prompt text states (caption dropout): {'yes' if a.get('empty_prompt_done') else 'no'}")
        skipped = a.get("skipped", [])
        lines.append(f"  skipped inputs: {len(skipped)}")
        lines += [f"    {s['id']}: {s['reason']}" for s in skipped]
        return "\n".join(lines)
