"""Stage 1: encode every image once with the VAE and every caption with CLIP into a zarr latent store.

`run(config)` is the whole stage; `cli` is its click wrapper. Re-running on the same store is incremental: only
samples that are new or whose content hash changed are encoded, removed samples free their slots.

Precompute shards (data parallel; not zarr's shard files, see t2i/store.py): zarr rewrites a whole shard file to
change a row of it, so processes writing rows of one store would lose each other's updates. Precompute shard k of N
(`--num_shards N --shard_id k`) therefore encodes samples k, k+N, k+2N, ... into its own ordinary store
`<output_dir>.shards/shard-k-of-N.zarr`, and one later run with `--merge_shards N` fills the store at --output_dir,
copying each row a finished shard store holds with the same content hash and encoding only the rest.
"""

import dataclasses
import functools
import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import zarr
from tqdm import tqdm

from t2i.cli import cli_errors, device_option
from t2i.images import crops, decode_image, first_line, to_array
from t2i.store import IDENTITY_KEYS, SCHEMA_VERSION, STORE_DTYPES, LatentStore, StoreError, now

DEFAULT_MAX_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class PrecomputeConfig:
    pretrained_model_name_or_path: str
    output_dir: str
    train_data_dir: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    cache_dir: str | None = None
    revision: str | None = None
    variant: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    max_train_samples: int | None = None
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    num_crops: int = 1
    batch_size: int = 8
    chunk_rows: int = 32
    mixed_precision: str = "no"
    vae_precision: str = "fp32"
    store_dtype: str = "fp16"
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    seed: int = 0
    overwrite: bool = False
    device_target: str | None = None
    num_shards: int = 1
    shard_id: int = 0
    merge_shards: int = 0

    def __post_init__(self):
        if (self.train_data_dir is None) == (self.dataset_name is None):
            raise ValueError("give exactly one of --train_data_dir or --dataset_name")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        for flag, value, choices in (
            ("--mixed_precision", self.mixed_precision, ("no", "fp16", "bf16")),
            ("--vae_precision", self.vae_precision, ("fp32", "fp16", "bf16")),
            ("--store_dtype", self.store_dtype, tuple(STORE_DTYPES)),
        ):
            if value not in choices:
                raise ValueError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
        if self.batch_size < 1 or self.chunk_rows < 1:
            raise ValueError("--batch_size and --chunk_rows must be at least 1")
        if self.num_crops < 1:
            raise ValueError(f"--num_crops must be at least 1, got {self.num_crops}")
        if self.center_crop and self.num_crops > 1:
            raise ValueError(f"--num_crops {self.num_crops} needs random crops: --center_crop takes the same crop "
                             "every time; drop one of them")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError("--max_train_samples must be at least 1")
        if self.num_shards < 1:
            raise ValueError(f"--num_shards must be at least 1, got {self.num_shards}")
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"--shard_id must be in 0..{self.num_shards - 1} for --num_shards {self.num_shards}, "
                             f"got {self.shard_id}")
        if self.merge_shards < 0:
            raise ValueError(f"--merge_shards must be at least 1 (or 0 for no merge), got {self.merge_shards}")
        if self.merge_shards and self.num_shards > 1:
            raise ValueError("--merge_shards runs in one process after the shards: drop --num_shards/--shard_id")

    @property
    def store_path(self) -> Path:
        """Where this run writes: --output_dir, or this shard's own store next to it."""
        if self.num_shards == 1:
            return Path(self.output_dir)
        return shard_path(self.output_dir, self.shard_id, self.num_shards)


def shard_path(output_dir, shard_id: int, num_shards: int) -> Path:
    root = Path(output_dir)
    return root.with_name(root.name + ".shards") / f"shard-{shard_id}-of-{num_shards}.zarr"


@dataclass
class Sample:
    """One dataset row. The image bytes are read on demand, so a large dataset is never held in memory."""

    id: str
    captions: list
    read: Callable[[], bytes] | None = None
    content_hash: str = ""
    error: str | None = None


def content_hash(blocks, captions) -> str:
    """sha256 over the image bytes (given as an iterable of blocks) and the captions: what decides re-encoding."""
    h = hashlib.sha256()
    for block in blocks:
        h.update(block)
    h.update(json.dumps(captions).encode())
    return h.hexdigest()


def _file_blocks(path: Path):
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(1 << 20), b"")


def _captions(value):
    """A caption cell as a list of non-empty strings (the seed script accepts a string or a list of strings)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return []
    return [c.strip() for c in value if isinstance(c, str) and c.strip()]


def read_imagefolder(data_dir, image_column="image", caption_column="text"):
    """Rows of an HF imagefolder (metadata.jsonl with `file_name` + caption column), read file by file.

    Read here rather than through `datasets` so that one unreadable file is one skipped sample, not a failed run.
    """
    data_dir = Path(data_dir).resolve()
    meta = data_dir / "metadata.jsonl"
    if not meta.is_file():
        raise ValueError(f"--train_data_dir: {data_dir} has no metadata.jsonl (one JSON line per image: file_name, text)")
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--train_data_dir: {meta} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    samples = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            samples.append(Sample(id=f"metadata.jsonl:{lineno}", captions=[], error=f"invalid JSON ({e.msg})"))
            continue
        name = row.get("file_name") if isinstance(row, dict) else None
        if not isinstance(name, str) or not name:
            samples.append(Sample(id=f"metadata.jsonl:{lineno}", captions=[], error="no file_name"))
            continue
        sample = Sample(id=name, captions=_captions(row.get(caption_column)))
        path = (data_dir / name).resolve()
        if not path.is_relative_to(data_dir):
            sample.error = "file_name points outside the data folder"
        elif not path.is_file():
            sample.error = "file not found"
        else:
            try:
                sample.content_hash = content_hash(_file_blocks(path), sample.captions)
                sample.read = path.read_bytes
            except OSError as e:
                sample.error = f"unreadable file ({e.strerror or e})"
        samples.append(sample)
    return samples


def _row_image_bytes(ds, row: int, column: str) -> bytes:
    return ds[row][column]["bytes"]


def read_hf_dataset(name, config_name=None, cache_dir=None, image_column="image", caption_column="text"):
    """Rows of a `datasets` dataset (a `save_to_disk` folder, or a name/path `load_dataset` understands)."""
    import datasets

    path = Path(name)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    except Exception as e:  # datasets raises a dozen unrelated types (missing files, hub errors, bad configs)
        raise ValueError(f"--dataset_name {name}: cannot load it ({first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"--dataset_name {name}: no 'train' split; splits are {', '.join(ds)}")
        ds = ds["train"]
    for column in (image_column, caption_column):
        if column not in ds.column_names:
            raise ValueError(f"--dataset_name {name}: no column {column!r}; columns are {', '.join(ds.column_names)}")
    try:
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    except Exception as e:  # the column holds something `datasets` cannot read as images
        raise ValueError(
            f"--image_column {image_column!r} of {name} is not an image column ({first_line(e)})"
        ) from None
    samples, seen = [], {}
    for i, row in enumerate(ds):
        image = row[image_column] or {}
        sample_id = image.get("path") or f"row-{i:08d}"
        # Embedded images keep only their base name, so two folders' 0001.jpg share a path: number the repeats.
        seen[sample_id] = seen.get(sample_id, 0) + 1
        if seen[sample_id] > 1:
            sample_id = f"{sample_id}#{seen[sample_id]}"
        sample = Sample(id=sample_id, captions=_captions(row[caption_column]))
        if image.get("bytes") is not None:
            sample.content_hash = content_hash([image["bytes"]], sample.captions)
            sample.read = functools.partial(_row_image_bytes, ds, i, image_column)
        elif image.get("path") and Path(image["path"]).is_file():
            file = Path(image["path"])
            sample.content_hash = content_hash(_file_blocks(file), sample.captions)
            sample.read = file.read_bytes
        else:
            sample.error = "no image data"
        samples.append(sample)
    return samples


def load_samples(config: PrecomputeConfig):
    if config.train_data_dir is not None:
        samples = read_imagefolder(config.train_data_dir, config.image_column, config.caption_column)
    else:
        samples = read_hf_dataset(
            config.dataset_name, config.dataset_config_name, config.cache_dir, config.image_column,
            config.caption_column,
        )
    seen = set()
    for s in samples:
        if s.error is None and not s.captions:
            s.error = f"missing caption (column {config.caption_column!r})"
        if s.id in seen:
            s.error, s.id = "duplicate id", f"{s.id}#dup{len(seen)}"
        seen.add(s.id)
    if config.max_train_samples is not None and config.max_train_samples < len(samples):
        # As the seed script: a seeded shuffle, then the first N.
        order = np.random.default_rng(config.seed).permutation(len(samples))[: config.max_train_samples]
        samples = [samples[i] for i in sorted(order)]
    return samples


def store_identity(config: PrecomputeConfig, fingerprint: str) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "model_fingerprint": fingerprint,
        "resolution": config.resolution,
        "center_crop": config.center_crop,
        "random_flip": config.random_flip,
        "num_crops": config.num_crops,
        "store_dtype": config.store_dtype,
    }


def existing_store(config: PrecomputeConfig, identity: dict):
    """The store at --output_dir to update, or None when a new one is to be created.

    Checked before any model is loaded, so a refused run is quick and leaves the store untouched.
    """
    root = config.store_path
    if LatentStore.exists(root):
        try:
            store = LatentStore.open(root, mode="r+", flag="--output_dir")
            old = store.attrs
        except StoreError:
            # Another schema version: its attributes as they are, so that the refusal names what differs.
            store, old = None, dict(zarr.open_group(str(root), mode="r").attrs)
        changed = [k for k in IDENTITY_KEYS if old.get(k) != identity[k]]
        if not changed:
            return store
        if not config.overwrite:
            detail = ", ".join(f"{k} {old.get(k)!r} -> {identity[k]!r}" for k in changed)
            raise StoreError(f"{root}: store was built with different settings ({detail}); pass --overwrite to rebuild")
    elif root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise StoreError(f"--output_dir: {root} exists and is not a latent store; choose an empty or new path")
    return None


def create_store(config, identity, attrs, shapes):
    root = config.store_path
    if root.exists():
        shutil.rmtree(root)
    moment_shape, text_shape = shapes
    return LatentStore.create(
        root, {**attrs, **identity}, num_crops=config.num_crops, random_flip=config.random_flip,
        moment_shape=moment_shape, text_shape=text_shape, max_captions=1, chunk_rows=config.chunk_rows,
        dtype=STORE_DTYPES[config.store_dtype],
    )


def plan(store: LatentStore, samples):
    """Decide which slot each valid sample goes to and which samples need encoding.

    Returns (todo, freed, num_slots): todo = [(slot, sample)] to encode, freed = slots whose samples were removed.
    """
    index = store.index()
    wanted = {s.id for s in samples}
    freed = sorted(slot for sid, (slot, _, _) in index.items() if sid not in wanted)
    kept = {slot for sid, (slot, _, _) in index.items() if sid in wanted}
    free = [slot for slot in range(store.num_slots) if slot not in kept]
    next_slot = store.num_slots
    todo = []
    for s in samples:
        if s.id in index:
            slot, h, done = index[s.id]
            if done and h == s.content_hash:
                continue
            todo.append((slot, s))
        elif free:
            todo.append((free.pop(0), s))
        else:
            todo.append((next_slot, s))
            next_slot += 1
    return todo, freed, next_slot


def write_rows(store: LatentStore, name: str, slots, values):
    """values[i] into row slots[i] of array `name`; the one place precompute writes rows (a test interrupts it)."""
    store.write(name, slots, values)


def write_complete_rows(store: LatentStore, slots, moments, text, counts, corners, ids, hashes):
    write_rows(store, "moments", slots, moments)
    write_rows(store, "text_states", slots, text)
    write_rows(store, "num_captions", slots, counts)
    write_rows(store, "crop", slots, corners)
    write_rows(store, "sample_id", slots, np.array(ids, dtype=object))
    write_rows(store, "content_hash", slots, np.array(hashes, dtype=object))
    # Last: the slot is complete only now. A kill before this line leaves it to be redone by the next run.
    write_rows(store, "done", slots, np.ones(len(slots), bool))


def open_shards(config: PrecomputeConfig, identity: dict) -> list:
    """The shard stores a --merge_shards run copies from, read-only; all must exist and match the main store.

    A missing shard is an error rather than a reason to encode its samples here: it usually means a shard is still
    running or a wrong N, and silently encoding 1/N of the data in one process is what sharding was meant to avoid.
    """
    paths = [shard_path(config.output_dir, k, config.merge_shards) for k in range(config.merge_shards)]
    missing = [str(p) for p in paths if not LatentStore.exists(p)]
    if missing:
        raise StoreError(f"--merge_shards {config.merge_shards}: no shard store at {', '.join(missing)}; "
                         f"run those shards first (--num_shards {config.merge_shards} --shard_id K)")
    shards = [LatentStore.open(p, flag="--merge_shards") for p in paths]
    for path, shard in zip(paths, shards):
        changed = [k for k in IDENTITY_KEYS if shard.attrs.get(k) != identity[k]]
        if changed:
            detail = ", ".join(f"{k} {shard.attrs.get(k)!r} != {identity[k]!r}" for k in changed)
            raise StoreError(f"{path}: shard store was built with different settings ({detail}); re-run that shard")
    return shards


def shard_rows(shards) -> dict:
    """sample_id -> (shard number, slot, content_hash) for every complete row of the shard stores."""
    rows = {}
    for k, shard in enumerate(shards):
        for sample_id, (slot, h, done) in shard.index().items():
            if done:
                rows[sample_id] = (k, slot, h)
    return rows


def copy_from_shards(store: LatentStore, copies, shards):
    """copies = [(slot, shard number, shard slot)]: shard rows into planned main-store slots, in slot order.

    Batches are whole multiples of the main store's shard file, so each of its shard files is written about once.
    """
    if not copies:
        return
    copies = sorted(copies)
    batch_rows = store.chunk_rows * max(1, 256 // store.chunk_rows)
    width = store["text_states"].shape[1]
    crops = [shard["crop"][:] for shard in shards]
    ids = [shard["sample_id"][:] for shard in shards]
    hashes = [shard["content_hash"][:] for shard in shards]
    for b in range(0, len(copies), batch_rows):
        batch = copies[b : b + batch_rows]
        n = len(batch)
        moments = np.zeros((n,) + store["moments"].shape[1:], store["moments"].dtype)
        text = np.zeros((n, width) + store["text_states"].shape[2:], store["text_states"].dtype)
        counts, crop = np.zeros(n, np.int32), np.zeros((n,) + store["crop"].shape[1:], np.int32)
        sample_ids, content_hashes = [""] * n, [""] * n
        for k, shard in enumerate(shards):
            rows = [i for i, (_, src, _) in enumerate(batch) if src == k]
            if not rows:
                continue
            src_slots = np.array([batch[i][2] for i in rows])
            m, t, c = shard.read(src_slots)
            # The shard's caption axis can be wider or narrower than the main one; rows beyond num_captions are zero.
            cols = min(width, t.shape[1])
            moments[rows] = m
            text[rows, :cols] = t[:, :cols]
            counts[rows] = c
            crop[rows] = crops[k][src_slots]
            for i, slot in zip(rows, src_slots):
                sample_ids[i], content_hashes[i] = str(ids[k][slot]), str(hashes[k][slot])
        write_complete_rows(store, [slot for slot, _, _ in batch], moments, text, counts, crop, sample_ids,
                            content_hashes)


def remove_partial_files(root: Path):
    """Temp files that a killed run left behind (zarr writes each chunk or shard file as temp file + rename)."""
    for path in root.rglob("*.partial"):
        path.unlink(missing_ok=True)


def encode_views(vae, pixels: np.ndarray, random_flip: bool) -> np.ndarray:
    """pixels (B, N, 3, H, W) of N crops -> float32 moments (B, V, 2C, h, w), view = crop * F + flipped.

    One VAE call per crop, on its B images and their mirror images, so that a call's batch (and memory) does not grow
    with --num_crops.
    """
    import mindspore as ms

    per_crop = []
    for c in range(pixels.shape[1]):
        x = pixels[:, c]
        if random_flip:
            x = np.concatenate([x, x[..., ::-1]])
        m = vae.encode(ms.Tensor(np.ascontiguousarray(x), vae.dtype))[0].float().asnumpy()
        per_crop.append(m.reshape(-1, len(pixels), *m.shape[1:]).swapaxes(0, 1))
    return np.concatenate(per_crop, axis=1)


def run(config: PrecomputeConfig) -> dict:
    """Encode the dataset (or this shard of it) into config.store_path; returns a summary dict."""
    from t2i import models, runtime

    runtime.setup(config.device_target)
    print(json.dumps(dataclasses.asdict(config), indent=2))
    model_dir = models.check_model_dir(config.pretrained_model_name_or_path)
    samples = load_samples(config)
    if all(s.error for s in samples):
        first = f"; first: {samples[0].id}: {samples[0].error}" if samples else ""
        raise ValueError(f"no usable samples in {config.train_data_dir or config.dataset_name} "
                         f"({len(samples)} rows, all skipped{first})")
    # Every shard lists the same samples in the same order, so the position alone decides which shard encodes one.
    samples = samples[config.shard_id :: config.num_shards]
    skipped = [{"id": s.id, "reason": s.error} for s in samples if s.error]
    good = [s for s in samples if not s.error]
    identity = store_identity(config, models.fingerprint(model_dir))
    store = existing_store(config, identity)
    shards = open_shards(config, identity)

    vae = models.load_vae(model_dir, config.revision, config.variant, models.DTYPES[config.vae_precision])
    tokenizer, text_encoder = models.load_text_encoder(
        model_dir, config.revision, config.variant, models.DTYPES[config.mixed_precision]
    )
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = config.resolution // factor
    shapes = (
        (2 * vae.config.latent_channels, latent, latent),
        (tokenizer.model_max_length, text_encoder.config.hidden_size),
    )
    if store is None:
        attrs = {
            "pretrained_model_name_or_path": str(model_dir),
            "dataset": config.train_data_dir or config.dataset_name,
            "vae_scaling_factor": float(vae.config.scaling_factor),
            "vae_dtype": config.vae_precision,
            "text_encoder_dtype": config.mixed_precision,
            "latent_shape": [vae.config.latent_channels, latent, latent],
            "text_shape": list(shapes[1]),
        }
        store = create_store(config, identity, attrs, shapes)
    remove_partial_files(store.root)

    todo, freed, num_slots = plan(store, good)
    # A shard can hold no usable sample at all (fewer samples than shards).
    store.resize(num_slots, max((len(s.captions) for s in good), default=1))
    # `done` goes false before anything else is touched: a slot being rewritten or freed must not count as complete
    # while its rows are a mix of old and new data (a kill at any later point then leaves it to the next run).
    stale = sorted({slot for slot, _ in todo} | set(freed))
    write_rows(store, "done", stale, np.zeros(len(stale), bool))
    write_rows(store, "sample_id", freed, np.full(len(freed), "", dtype=object))
    store.group.attrs.update({"updated": now(), "skipped": skipped})

    held = shard_rows(shards)
    copies = [(slot, *held[s.id][:2]) for slot, s in todo if s.id in held and held[s.id][2] == s.content_hash]
    copy_from_shards(store, copies, shards)
    copied = {slot for slot, _, _ in copies}
    encode = [(slot, s) for slot, s in todo if slot not in copied]

    dtype = np.dtype(STORE_DTYPES[config.store_dtype])
    start = time.perf_counter()
    encoded, released = 0, []
    bar = tqdm(total=len(encode), desc="precompute", unit="img", disable=not encode)
    for b in range(0, len(encode), config.batch_size):
        batch, pixels, corners = [], [], []
        for slot, s in encode[b : b + config.batch_size]:
            try:
                data = s.read()
                img = decode_image(data, config.max_image_pixels)
            except (OSError, ValueError) as e:
                reason = f"unreadable file ({e.strerror or e})" if isinstance(e, OSError) else str(e)
                skipped.append({"id": s.id, "reason": reason})
                released.append(slot)
                continue
            # The hash of the bytes actually encoded, in case the file changed since it was listed.
            s.content_hash = content_hash([data], s.captions)
            # Random crops are seeded per sample so that a re-run (or a resumed kill -9) reproduces them.
            rng = random.Random(f"{config.seed}:{s.id}")
            views = crops(img, config.resolution, config.center_crop, config.num_crops, rng)
            batch.append((slot, s))
            pixels.append(np.stack([to_array(crop) for crop, _ in views]))
            corners.append([corner for _, corner in views])
        bar.update(len(encode[b : b + config.batch_size]) - len(batch))
        if not batch:
            continue
        moments = encode_views(vae, np.stack(pixels), config.random_flip)
        with np.errstate(over="ignore"):  # an fp16 overflow becomes inf, which the finiteness check below reports
            moments = moments.astype(dtype)
        captions = [c for _, s in batch for c in s.captions]
        states = models.encode_text(tokenizer, text_encoder, captions).float().asnumpy()
        text = np.zeros((len(batch), store["text_states"].shape[1]) + states.shape[1:], dtype)
        counts, pos = [], 0
        for i, (_, s) in enumerate(batch):
            n = len(s.captions)
            text[i, :n] = states[pos : pos + n]
            pos += n
            counts.append(n)
        # Checked after the cast to the store dtype: a value that overflows fp16 is as unusable as a NaN.
        keep = np.array([np.isfinite(moments[i]).all() and np.isfinite(text[i]).all() for i in range(len(batch))])
        for (slot, s), ok in zip(batch, keep):
            if not ok:
                skipped.append({"id": s.id, "reason": "non-finite latents or text states (try --vae_precision fp32)"})
                released.append(slot)
        kept = [pair for pair, ok in zip(batch, keep) if ok]
        slots = [slot for slot, _ in kept]
        write_complete_rows(
            store, slots, moments[keep], text[keep], np.array(counts, np.int32)[keep],
            np.array(corners, np.int32)[keep], [s.id for _, s in kept], [s.content_hash for _, s in kept],
        )
        encoded += len(slots)
        bar.update(len(batch))
    bar.close()
    # A changed sample that now fails keeps no claim on its slot (its `done` is already false).
    write_rows(store, "sample_id", sorted(set(released)), np.full(len(set(released)), "", dtype=object))
    elapsed = time.perf_counter() - start
    valid = len(store.valid_slots())
    store.group.attrs.update({"updated": now(), "skipped": skipped, "num_samples": valid})
    rate = encoded / elapsed if elapsed > 0 else 0.0
    unchanged = len(good) - len(todo)
    from_shards = f"{len(copies)} copied from {len(shards)} shards, " if config.merge_shards else ""
    print(
        f"precompute: {from_shards}{encoded} encoded, {unchanged} unchanged, {len(freed)} removed, "
        f"{len(skipped)} skipped; {valid} samples in {config.store_path}; {rate:.1f} images/s"
    )
    for s in skipped:
        print(f"  skipped {s['id']}: {s['reason']}")
    return {"encoded": encoded, "copied": len(copies), "unchanged": unchanged, "removed": len(freed),
            "skipped": skipped, "num_samples": valid, "images_per_s": rate}


@click.command(context_settings={"show_default": True})
@click.option("--pretrained_model_name_or_path", help="Local diffusers pipeline folder (required unless --inspect).")
@click.option("--revision", default=None)
@click.option("--variant", default=None, help="Weights variant, e.g. fp16.")
@click.option("--train_data_dir", default=None, help="Imagefolder with metadata.jsonl (file_name + caption column).")
@click.option("--dataset_name", default=None, help="A `datasets` name/path or a save_to_disk folder.")
@click.option("--dataset_config_name", default=None)
@click.option("--cache_dir", default=None)
@click.option("--image_column", default="image")
@click.option("--caption_column", default="text")
@click.option("--max_train_samples", type=int, default=None)
@click.option("--resolution", type=int, default=512)
@click.option("--center_crop", is_flag=True, help="Centre crop (default: random crop, recorded per sample).")
@click.option("--random_flip", is_flag=True, help="Also store the moments of the horizontally flipped image.")
@click.option("--num_crops", type=int, default=1,
              help="Random crops stored per image (each epoch trains on one of them); N times the store size.")
@click.option("--output_dir", default="latents.zarr", help="The store to create or update.")
@click.option("--batch_size", type=int, default=8)
@click.option("--chunk_rows", type=int, default=32,
              help="Samples per zarr shard file (inside it each sample is a chunk of its own).")
@click.option("--mixed_precision", type=click.Choice(["no", "fp16", "bf16"]), default="no",
              help="Text encoder precision.")
@click.option("--vae_precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
              help="VAE precision (fp16 VAEs can give NaN latents).")
@click.option("--store_dtype", type=click.Choice(list(STORE_DTYPES)), default="fp16")
@click.option("--max_image_pixels", type=int, default=DEFAULT_MAX_PIXELS)
@click.option("--seed", type=int, default=0)
@click.option("--overwrite", is_flag=True, help="Rebuild a store made with other settings.")
@device_option
@click.option("--num_shards", type=int, default=1,
              help="Split the encoding over N processes; each writes <output_dir>.shards/shard-K-of-N.zarr.")
@click.option("--shard_id", type=int, default=0, help="Which shard this process encodes: 0..N-1.")
@click.option("--merge_shards", type=int, default=0,
              help="Fill --output_dir from the N finished shard stores (encodes only what no shard holds).")
@click.option("--inspect", "inspect_store", default=None, help="Print what the store at this path holds, and exit.")
def cli(inspect_store, **kwargs):
    """Encode a captioned image set into a zarr latent store (VAE moments + CLIP hidden states)."""
    with cli_errors():
        if inspect_store:
            click.echo(LatentStore.open(inspect_store, flag="--inspect").describe())
            return
        if not kwargs["pretrained_model_name_or_path"]:
            raise ValueError("--pretrained_model_name_or_path is required")
        run(PrecomputeConfig(**kwargs))
