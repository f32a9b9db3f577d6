"""The zarr latent store: the contract between precompute (writer) and train (reader).

Layout (zarr v3 group), one row ("slot") per sample, chunked along the slot axis so that a batch is a few chunk reads:
  moments       (S, V, 2C, h, w)  VAE posterior mean ‖ logvar; V=2 when flips are stored (index 1 = flipped image)
  text_states   (S, K, L, D)      CLIP last hidden state of up to K captions per sample
  num_captions  (S,)  int32       how many of the K caption rows are real
  crop          (S, 2) int32      top-left of the crop taken from the resized image
  sample_id     (S,)  str         the source id (file_name for an imagefolder), "" for a free slot
  content_hash  (S,)  str         sha256 of image bytes + captions; decides re-encoding
  done          (S,)  bool        written last: a slot counts only once all its data is in

Attributes describe the store (see `describe`); `vae_scaling_factor` is read by train from here and nowhere else.
Every chunk and metadata write of zarr's LocalStore is a temp-file + rename, and a slot's `done` flag is written
after its data, so a run killed at any point leaves a store whose done slots are complete.
"""

import datetime
from pathlib import Path

import numpy as np
import zarr

from t2i import __version__

SCHEMA_VERSION = 1
STORE_DTYPES = {"fp16": "float16", "fp32": "float32"}
# Attributes that make two stores incompatible: changing any of them means every latent must be re-encoded.
IDENTITY_KEYS = ("schema_version", "model_fingerprint", "resolution", "center_crop", "random_flip", "store_dtype")


class StoreError(ValueError):
    pass


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{root}: store schema version {version}, this t2i reads {SCHEMA_VERSION}; "
                "re-run t2i-precompute with --overwrite"
            )
        return cls(root, group)

    @classmethod
    def create(cls, root, attrs, *, views, moment_shape, text_shape, max_captions, chunk_rows, dtype):
        group = zarr.open_group(str(root), mode="w")
        c2, h, w = moment_shape
        length, dim = text_shape
        group.create_array("moments", shape=(0, views, c2, h, w), chunks=(chunk_rows, views, c2, h, w), dtype=dtype)
        group.create_array(
            "text_states", shape=(0, max_captions, length, dim), chunks=(chunk_rows, 1, length, dim), dtype=dtype
        )
        group.create_array("num_captions", shape=(0,), chunks=(4096,), dtype="int32")
        group.create_array("crop", shape=(0, 2), chunks=(4096, 2), dtype="int32")
        group.create_array("sample_id", shape=(0,), chunks=(4096,), dtype=str)
        group.create_array("content_hash", shape=(0,), chunks=(4096,), dtype=str)
        group.create_array("done", shape=(0,), chunks=(4096,), dtype=bool)
        group.attrs.update({**attrs, "schema_version": SCHEMA_VERSION, "tool_version": __version__, "created": now()})
        return cls(root, group)

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
        return self.group["moments"].chunks[0]

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
        for name in ("moments", "num_captions", "crop", "sample_id", "content_hash", "done"):
            arr = self.group[name]
            arr.resize((num_slots,) + arr.shape[1:])
        text = self.group["text_states"]
        text.resize((num_slots, max(max_captions, text.shape[1])) + text.shape[2:])

    def read(self, slots):
        """moments, text_states and num_captions of the given slots, as NumPy (one read per touched chunk)."""
        slots = np.asarray(slots)
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        moments = self.group["moments"].get_orthogonal_selection((sorted_slots,))[inverse]
        text = self.group["text_states"].get_orthogonal_selection((sorted_slots,))[inverse]
        counts = self.group["num_captions"].get_orthogonal_selection((sorted_slots,))[inverse]
        return moments, text, counts

    def describe(self) -> str:
        a = self.attrs
        valid = len(self.valid_slots())
        lines = [f"t2i latent store {self.root}"]
        for key in (
            "schema_version", "tool_version", "created", "updated", "pretrained_model_name_or_path",
            "model_fingerprint", "vae_scaling_factor", "resolution", "center_crop", "random_flip",
            "store_dtype", "vae_dtype", "text_encoder_dtype", "latent_shape", "text_shape",
        ):
            lines.append(f"  {key}: {a.get(key)}")
        lines.append(f"  samples: {valid} complete of {self.num_slots} slots")
        text = self.group["text_states"]
        lines.append(f"  captions per sample: up to {text.shape[1]}")
        skipped = a.get("skipped", [])
        lines.append(f"  skipped inputs: {len(skipped)}")
        lines += [f"    {s['id']}: {s['reason']}" for s in skipped]
        return "\n".join(lines)
