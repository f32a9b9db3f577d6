"""Stage 1: encode every image once with the VAE and every caption with CLIP into a zarr latent store.

`run(config)` is the whole stage; `cli` is its click wrapper. Re-running on the same store is incremental: only
samples that are new or whose content hash changed are encoded, removed samples free their slots. The data set is read
by t2i/dataset.py; `--num_shards`/`--merge_shards` (one store per process, merged later) are t2i/shards.py's.
"""

import dataclasses
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import zarr
from tqdm import tqdm

from t2i.cli import cli_errors, config_file_option, device_option
from t2i.dataset import content_hash, load_samples
from t2i.hub import resolve_model
from t2i.images import crops, decode_image, to_array
from t2i.shards import copy_from_shards, open_shards, shard_path
from t2i.store import STORE_DTYPES, LatentStore, StoreError, StoreIdentity, now

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


@dataclass
class Encoders:
    """The VAE and the text encoder with its tokenizer, loaded once per run."""

    vae: object
    tokenizer: object
    text_encoder: object

    @classmethod
    def load(cls, model_dir, config: PrecomputeConfig) -> "Encoders":
        from t2i import models

        vae = models.load_vae(model_dir, config.revision, config.variant, models.DTYPES[config.vae_precision])
        tokenizer, text_encoder = models.load_text_encoder(
            model_dir, config.revision, config.variant, models.DTYPES[config.mixed_precision]
        )
        return cls(vae, tokenizer, text_encoder)


def store_identity(config: PrecomputeConfig, fingerprint: str) -> StoreIdentity:
    return StoreIdentity(model_fingerprint=fingerprint, resolution=config.resolution, center_crop=config.center_crop,
                         random_flip=config.random_flip, num_crops=config.num_crops, store_dtype=config.store_dtype)


def existing_store(config: PrecomputeConfig, identity: StoreIdentity):
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
        detail = identity.mismatch(old)
        if not detail:
            return store
        if not config.overwrite:
            raise StoreError(f"{root}: store was built with different settings ({detail}); pass --overwrite to rebuild")
    elif root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise StoreError(f"--output_dir: {root} exists and is not a latent store; choose an empty or new path")
    return None


def create_store(config: PrecomputeConfig, identity: StoreIdentity, model_dir, encoders: Encoders) -> LatentStore:
    """A new empty store at config.store_path (replacing one made with other settings), shaped for these encoders."""
    vae = encoders.vae.config
    latent = config.resolution // 2 ** (len(vae.block_out_channels) - 1)
    text_shape = (encoders.tokenizer.model_max_length, encoders.text_encoder.config.hidden_size)
    attrs = {
        "pretrained_model_name_or_path": str(model_dir),
        "dataset": config.train_data_dir or config.dataset_name,
        "vae_scaling_factor": float(vae.scaling_factor),
        "vae_dtype": config.vae_precision,
        "text_encoder_dtype": config.mixed_precision,
        "latent_shape": [vae.latent_channels, latent, latent],
        "text_shape": list(text_shape),
    }
    root = config.store_path
    if root.exists():
        shutil.rmtree(root)
    return LatentStore.create(
        root, {**attrs, **identity.attrs()}, num_crops=config.num_crops, random_flip=config.random_flip,
        moment_shape=(2 * vae.latent_channels, latent, latent), text_shape=text_shape, max_captions=1,
        chunk_rows=config.chunk_rows, dtype=STORE_DTYPES[config.store_dtype],
    )


def remove_partial_files(root: Path):
    """Temp files that a killed run left behind (zarr writes each chunk or shard file as temp file + rename)."""
    for path in root.rglob("*.partial"):
        path.unlink(missing_ok=True)


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


def prepare_slots(store: LatentStore, good, skipped):
    """Plan the slots of the usable samples (see `plan`), size the store for them and mark every slot about to be
    rewritten or freed as not done; returns (todo, freed)."""
    todo, freed, num_slots = plan(store, good)
    # A shard can hold no usable sample at all (fewer samples than shards).
    store.resize(num_slots, max((len(s.captions) for s in good), default=1))
    # `done` goes false before anything else is touched: a slot being rewritten or freed must not count as complete
    # while its rows are a mix of old and new data (a kill at any later point then leaves it to the next run).
    stale = sorted({slot for slot, _ in todo} | set(freed))
    store.write("done", stale, np.zeros(len(stale), bool))
    release_slots(store, freed)
    store.group.attrs.update({"updated": now(), "skipped": skipped})
    return todo, freed


def release_slots(store: LatentStore, slots):
    """Slots that no longer hold a sample (their `done` is already false)."""
    slots = sorted(set(slots))
    store.write("sample_id", slots, np.full(len(slots), "", dtype=object))


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


def crop_views(sample, data: bytes, img, config: PrecomputeConfig):
    """The decoded image's crops as the store keeps them: (pixels (N, 3, H, W) of N crops, their top-left corners)."""
    # The hash of the bytes actually encoded, in case the file changed since it was listed.
    sample.content_hash = content_hash([data], sample.captions)
    # Random crops are seeded per sample so that a re-run (or a resumed kill -9) reproduces them.
    rng = random.Random(f"{config.seed}:{sample.id}")
    views = crops(img, config.resolution, config.center_crop, config.num_crops, rng)
    return np.stack([to_array(crop) for crop, _ in views]), [corner for _, corner in views]


def encode_batch(encoders: Encoders, batch, pixels: np.ndarray, config: PrecomputeConfig, width: int):
    """The store rows of batch = [(slot, sample)]: moments, text states (padded to `width` captions) and caption
    counts, in the store dtype."""
    from t2i import models

    dtype = np.dtype(STORE_DTYPES[config.store_dtype])
    moments = encode_views(encoders.vae, pixels, config.random_flip)
    with np.errstate(over="ignore"):  # an fp16 overflow becomes inf, which the caller's finiteness check reports
        moments = moments.astype(dtype)
    captions = [c for _, s in batch for c in s.captions]
    states = models.encode_text(encoders.tokenizer, encoders.text_encoder, captions).float().asnumpy()
    text = np.zeros((len(batch), width) + states.shape[1:], dtype)
    counts, pos = [], 0
    for i, (_, s) in enumerate(batch):
        n = len(s.captions)
        text[i, :n] = states[pos : pos + n]
        pos += n
        counts.append(n)
    return moments, text, np.array(counts, np.int32)


def encode_empty_prompt(encoders: Encoders, config: PrecomputeConfig) -> np.ndarray:
    """The text states of "" (what t2i-train's --caption_dropout_probability trains on), in the store dtype."""
    from t2i import models

    states = models.encode_text(encoders.tokenizer, encoders.text_encoder, [""]).float().asnumpy()[0]
    return states.astype(STORE_DTYPES[config.store_dtype])


def encode_into(store: LatentStore, encode, encoders: Encoders, config: PrecomputeConfig, skipped) -> int:
    """Encode encode = [(slot, sample)] into their slots, batch by batch; returns how many rows were written.

    A sample that cannot be read, or whose latents or text states are not finite, is appended to `skipped` and its
    slot released.
    """
    encoded, released = 0, []
    bar = tqdm(total=len(encode), desc="precompute", unit="img", disable=not encode)
    for b in range(0, len(encode), config.batch_size):
        part = encode[b : b + config.batch_size]
        batch, pixels, corners = [], [], []
        for slot, s in part:
            try:
                data = s.read()
                img = decode_image(data, config.max_image_pixels)
            except (OSError, ValueError) as e:
                reason = f"unreadable file ({e.strerror or e})" if isinstance(e, OSError) else str(e)
                skipped.append({"id": s.id, "reason": reason})
                released.append(slot)
                continue
            views, corner = crop_views(s, data, img, config)
            batch.append((slot, s))
            pixels.append(views)
            corners.append(corner)
        bar.update(len(part) - len(batch))
        if not batch:
            continue
        moments, text, counts = encode_batch(encoders, batch, np.stack(pixels), config, store["text_states"].shape[1])
        # Checked after the cast to the store dtype: a value that overflows fp16 is as unusable as a NaN.
        keep = np.array([np.isfinite(moments[i]).all() and np.isfinite(text[i]).all() for i in range(len(batch))])
        for (slot, s), ok in zip(batch, keep):
            if not ok:
                skipped.append({"id": s.id, "reason": "non-finite latents or text states (try --vae_precision fp32)"})
                released.append(slot)
        kept = [pair for pair, ok in zip(batch, keep) if ok]
        store.write_complete(
            [slot for slot, _ in kept], moments[keep], text[keep], counts[keep], np.array(corners, np.int32)[keep],
            [s.id for _, s in kept], [s.content_hash for _, s in kept],
        )
        encoded += len(kept)
        bar.update(len(batch))
    bar.close()
    # A changed sample that now fails keeps no claim on its slot (its `done` is already false).
    release_slots(store, released)
    return encoded


def run(config: PrecomputeConfig) -> dict:
    """Encode the dataset (or this shard of it) into config.store_path; returns a summary dict."""
    from t2i import models, runtime

    runtime.setup(config.device_target)
    print(json.dumps(dataclasses.asdict(config), indent=2))
    model_dir = resolve_model(config.pretrained_model_name_or_path, components=models.FINGERPRINT_COMPONENTS,
                              revision=config.revision, variant=config.variant, cache_dir=config.cache_dir)
    # Every shard lists the same samples in the same order, so the position alone decides which shard encodes one.
    samples = load_samples(config)[config.shard_id :: config.num_shards]
    skipped = [{"id": s.id, "reason": s.error} for s in samples if s.error]
    good = [s for s in samples if not s.error]
    identity = store_identity(config, models.fingerprint(model_dir))
    store = existing_store(config, identity)
    shards = open_shards(config.output_dir, config.merge_shards, identity)

    encoders = Encoders.load(model_dir, config)
    if store is None:
        store = create_store(config, identity, model_dir, encoders)
    remove_partial_files(store.root)
    if store.empty_prompt() is None:  # also upgrades a store made before t2i kept it
        store.write_empty_prompt(encode_empty_prompt(encoders, config))
    todo, freed = prepare_slots(store, good, skipped)
    copied = copy_from_shards(store, todo, shards)
    start = time.perf_counter()
    encoded = encode_into(store, [(slot, s) for slot, s in todo if slot not in copied], encoders, config, skipped)
    elapsed = time.perf_counter() - start

    return report(config, store, skipped, encoded=encoded, copied=len(copied), unchanged=len(good) - len(todo),
                  removed=len(freed), num_shards=len(shards), elapsed=elapsed)


def report(config: PrecomputeConfig, store: LatentStore, skipped, *, encoded, copied, unchanged, removed, num_shards,
           elapsed) -> dict:
    """Record the outcome in the store's attributes, print it, and return it as run's summary."""
    valid = len(store.valid_slots())
    store.group.attrs.update({"updated": now(), "skipped": skipped, "num_samples": valid})
    rate = encoded / elapsed if elapsed > 0 else 0.0
    from_shards = f"{copied} copied from {num_shards} shards, " if config.merge_shards else ""
    print(
        f"precompute: {from_shards}{encoded} encoded, {unchanged} unchanged, {removed} removed, "
        f"{len(skipped)} skipped; {valid} samples in {config.store_path}; {rate:.1f} images/s"
    )
    for s in skipped:
        print(f"  skipped {s['id']}: {s['reason']}")
    return {"encoded": encoded, "copied": copied, "unchanged": unchanged, "removed": removed,
            "skipped": skipped, "num_samples": valid, "images_per_s": rate}


@config_file_option
@click.command(context_settings={"show_default": True})
@click.option("--pretrained_model_name_or_path",
              help="A local diffusers pipeline folder or a Hub model id (required unless --inspect).")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub model id.")
@click.option("--variant", default=None, help="Weights variant, e.g. fp16.")
@click.option("--train_data_dir", default=None, help="Imagefolder with metadata.jsonl (file_name + caption column).")
@click.option("--dataset_name", default=None,
              help="A Hub dataset id, a `datasets` name/path or a save_to_disk folder.")
@click.option("--dataset_config_name", default=None)
@click.option("--cache_dir", default=None,
              help="Where Hub models and datasets are cached (default: the Hugging Face cache, $HF_HOME).")
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
