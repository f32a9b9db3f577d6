"""Stage 1: encode every image once with the VAE and every caption with CLIP into a zarr latent store.

`run(config)` is the whole stage; `cli` is its click wrapper. Re-running on the same store is incremental: only
samples that are new or whose content hash changed are encoded, removed samples free their slots. The data set is read
by t2i/dataset.py; `--num_shards`/`--merge_shards` (one store per process, merged later) are t2i/shards.py's.
"""

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click
import zarr

from t2i.core.flags import DEVICE_TARGET_HELP, check, command, flag
from t2i.data.buckets import encode_buckets
from t2i.data.dataset import load_samples
from t2i.data.encode import Encoders, encode_empty_prompt, encode_into, prepare_slots
from t2i.data.shards import copy_from_shards, open_shards, shard_path
from t2i.data.store import SDXL_SCHEMA_VERSION, STORE_DTYPES, LatentStore, StoreError, StoreIdentity, bucket_group
from t2i.interop.hub import resolve_model

DEFAULT_MAX_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class PrecomputeConfig:
    pretrained_model_name_or_path: str = flag(
        help="A local diffusers pipeline folder or a Hub model id (required unless --inspect).", required=False)
    revision: str | None = flag(None, "Branch, tag or commit of a Hub model id.")
    variant: str | None = flag(None, "Weights variant, e.g. fp16.")
    train_data_dir: str | None = flag(None, "Imagefolder with metadata.jsonl (file_name + caption column).")
    dataset_name: str | None = flag(None, "A Hub dataset id, a `datasets` name/path or a save_to_disk folder.")
    dataset_config_name: str | None = flag(None)
    cache_dir: str | None = flag(None, "Where Hub models and datasets are cached (default: the Hugging Face cache, "
                                       "$HF_HOME).")
    image_column: str = flag("image")
    caption_column: str = flag("text")
    max_train_samples: int | None = flag(None, "Keep a seeded choice of this many rows (as the seed script).", min=1)
    resolution: int = flag(512, "Image size (aspect buckets: about resolution² pixels).", multiple_of=8)
    center_crop: bool = flag(False, "Centre crop (default: random crop, recorded per sample).")
    random_flip: bool = flag(False, "Also store the moments of the horizontally flipped image.")
    num_crops: int = flag(1, "Random crops stored per image (each epoch trains on one of them); N times the store "
                             "size.", min=1)
    aspect_buckets: bool = flag(False, "Keep each image's aspect ratio: encode it at the nearest of the buckets of "
                                       "about resolution² pixels.")
    bucket_step: int = flag(64, "Bucket sides are multiples of this (a multiple of 8).", multiple_of=8)
    max_aspect_ratio: float = flag(2.0, "Longest bucket side / shortest side.", min=1)
    min_bucket_size: int = flag(1, "Merge a bucket of fewer images into its nearest; a bucket smaller than train's "
                                   "batch (batch x accumulation x workers) is not trained.", min=1)
    output_dir: str = flag("latents.zarr", "The store to create or update.")
    batch_size: int = flag(8, "Images per VAE call.", min=1)
    chunk_rows: int = flag(32, "Samples per zarr shard file (inside it each sample is a chunk of its own).", min=1)
    mixed_precision: str = flag("no", "Text encoder precision.", choices=("no", "fp16", "bf16"))
    vae_precision: str = flag("fp32", "VAE precision (fp16 VAEs can give NaN latents).",
                              choices=("fp32", "fp16", "bf16"))
    store_dtype: str = flag("fp16", choices=tuple(STORE_DTYPES))
    max_image_pixels: int = flag(DEFAULT_MAX_PIXELS, "Refuse images larger than this (decompression bombs).", min=1)
    seed: int = flag(0, "Seeds the random crops (per sample) and --max_train_samples.")
    overwrite: bool = flag(False, "Rebuild a store made with other settings.")
    device_target: str | None = flag(None, DEVICE_TARGET_HELP)
    num_shards: int = flag(1, "Split the encoding over N processes; each writes "
                              "<output_dir>.shards/shard-K-of-N.zarr.", min=1)
    shard_id: int = flag(0, "Which shard this process encodes: 0..N-1.", min=0)
    merge_shards: int = flag(0, "Fill --output_dir from the N finished shard stores (encodes only what no shard "
                                "holds).", min=0)

    def __post_init__(self):
        check(self)
        if (self.train_data_dir is None) == (self.dataset_name is None):
            raise ValueError("give exactly one of --train_data_dir or --dataset_name")
        if self.center_crop and self.num_crops > 1:
            raise ValueError(f"--num_crops {self.num_crops} needs random crops: --center_crop takes the same crop "
                             "every time; drop one of them")
        if self.shard_id >= self.num_shards:
            raise ValueError(f"--shard_id must be in 0..{self.num_shards - 1} for --num_shards {self.num_shards}, "
                             f"got {self.shard_id}")
        if self.aspect_buckets and self.bucket_step > self.resolution:
            raise ValueError(f"--bucket_step {self.bucket_step} exceeds --resolution {self.resolution}")
        if self.merge_shards and self.num_shards > 1:
            raise ValueError("--merge_shards runs in one process after the shards: drop --num_shards/--shard_id")

    @property
    def store_path(self) -> Path:
        """Where this run writes: --output_dir, or this shard's own store next to it."""
        if self.num_shards == 1:
            return Path(self.output_dir)
        return shard_path(self.output_dir, self.shard_id, self.num_shards)


def store_identity(config: PrecomputeConfig, fingerprint: str, sdxl: bool = False) -> StoreIdentity:
    buckets = {"aspect_buckets": True, "bucket_step": config.bucket_step,
               "max_aspect_ratio": float(config.max_aspect_ratio)} if config.aspect_buckets else {}
    version = {"schema_version": SDXL_SCHEMA_VERSION} if sdxl else {}
    return StoreIdentity(**version, model_fingerprint=fingerprint, resolution=config.resolution,
                         center_crop=config.center_crop, random_flip=config.random_flip, num_crops=config.num_crops,
                         store_dtype=config.store_dtype, **buckets)


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


def create_store(config: PrecomputeConfig, identity: StoreIdentity, model_dir, encoders: Encoders, size=None,
                 root=None) -> LatentStore:
    """A new empty store at `root` (default config.store_path, replacing one made with other settings), shaped for
    these encoders and images of `size` (width, height; default the resolution's square). With --aspect_buckets and
    no size, the store of buckets that holds one such store per bucket."""
    vae = encoders.vae.config
    width, height = size or (config.resolution, config.resolution)
    factor = 2 ** (len(vae.block_out_channels) - 1)
    text_shape = (encoders.text.length, encoders.text.width)
    attrs = {
        "pretrained_model_name_or_path": str(model_dir),
        "dataset": config.train_data_dir or config.dataset_name,
        "vae_scaling_factor": float(vae.scaling_factor),
        "vae_dtype": config.vae_precision,
        "text_encoder_dtype": config.mixed_precision,
        "latent_shape": [vae.latent_channels, height // factor, width // factor],
        "text_shape": list(text_shape),
    }
    root = root or config.store_path
    if root.exists():
        shutil.rmtree(root)
    if config.aspect_buckets and size is None:
        return LatentStore.create_bucketed(root, {**attrs, **identity.attrs()}, sdxl=encoders.text.sdxl)
    return LatentStore.create(
        root, {**attrs, **identity.attrs(), **({"bucket": [width, height]} if size else {})},
        num_crops=config.num_crops, random_flip=config.random_flip,
        moment_shape=(2 * vae.latent_channels, height // factor, width // factor), text_shape=text_shape, max_captions=1,
        chunk_rows=config.chunk_rows, dtype=STORE_DTYPES[config.store_dtype], pooled_dim=encoders.text.pooled_dim,
    )


def remove_partial_files(root: Path):
    """Temp files that a killed run left behind (zarr writes each chunk or shard file as temp file + rename)."""
    for path in root.rglob("*.partial"):
        path.unlink(missing_ok=True)


def run(config: PrecomputeConfig) -> dict:
    """Encode the dataset (or this shard of it) into config.store_path; returns a summary dict."""
    from t2i.core import runtime
    from t2i.interop import models

    runtime.setup(config.device_target)
    print(json.dumps(dataclasses.asdict(config), indent=2))
    model_dir = resolve_model(config.pretrained_model_name_or_path, components=models.FINGERPRINT_COMPONENTS,
                              revision=config.revision, variant=config.variant, cache_dir=config.cache_dir)
    # Every shard lists the same samples in the same order, so the position alone decides which shard encodes one.
    samples = load_samples(config.train_data_dir, config.dataset_name, config.dataset_config_name, config.cache_dir,
                           config.image_column, config.caption_column, config.max_train_samples,
                           config.seed)[config.shard_id :: config.num_shards]
    skipped = [{"id": s.id, "reason": s.error} for s in samples if s.error]
    good = [s for s in samples if not s.error]
    identity = store_identity(config, models.fingerprint(model_dir), models.family(model_dir) == "sdxl")
    store = existing_store(config, identity)
    shards = open_shards(config.output_dir, config.merge_shards, identity)

    encoders = Encoders.load(model_dir, config)
    if store is None:
        store = create_store(config, identity, model_dir, encoders)
    remove_partial_files(store.root)
    if store.empty_prompt() is None:  # also upgrades a store made before t2i kept it
        store.write_empty_prompt(*encode_empty_prompt(encoders, config))
    if config.aspect_buckets:
        start = time.perf_counter()
        counts = encode_buckets(store, good, skipped, config, encoders, lambda size: create_store(
            config, identity, model_dir, encoders, size, store.root / bucket_group(size)), shards)
        return report(config, store, skipped, num_shards=len(shards), elapsed=time.perf_counter() - start, **counts)
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
    valid = store.num_complete()
    store.note_update(skipped, valid)
    rate = encoded / elapsed if elapsed > 0 else 0.0
    from_shards = f"{copied} copied from {num_shards} shards, " if config.merge_shards else ""
    print(
        f"precompute: {from_shards}{encoded} encoded, {unchanged} unchanged, {removed} removed, "
        f"{len(skipped)} skipped; {valid} samples in {config.store_path}; {rate:.1f} images/s"
    )
    if store.bucketed:
        print("  " + ", ".join(f"{w}x{h}: {len(part.valid_slots())}" for (w, h), part in store.parts()))
    for s in skipped:
        print(f"  skipped {s['id']}: {s['reason']}")
    return {"encoded": encoded, "copied": copied, "unchanged": unchanged, "removed": removed,
            "skipped": skipped, "num_samples": valid, "images_per_s": rate}


def _inspect(kwargs) -> bool:
    """--inspect PATH prints what the store holds instead of encoding."""
    path = kwargs.pop("inspect_store")
    if path:
        click.echo(LatentStore.open(path, flag="--inspect").describe())
        return True
    if not kwargs["pretrained_model_name_or_path"]:
        raise ValueError("--pretrained_model_name_or_path is required")
    return False


cli = command(PrecomputeConfig, lambda config: run(config), "Encode a captioned image set into a zarr latent store (VAE moments + CLIP "
              "hidden states).", prepare=_inspect,
              extra=[click.Option(["--inspect", "inspect_store"], default=None,
                                  help="Print what the store at this path holds, and exit.")])
