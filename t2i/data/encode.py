"""Precompute's encoding: which store slot each sample goes to (incremental re-runs) and the VAE/CLIP encoding of
samples into those slots, for one store, or one aspect bucket's store (t2i/buckets.py)."""

import random
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from t2i.data.dataset import content_hash
from t2i.data.images import crops, read_image, resized_size, target_size, to_array
from t2i.data.store import STORE_DTYPES, LatentStore, Rows


@dataclass
class Encoders:
    """The VAE and the text encoder(s) with their tokenizers (t2i.interop.models.TextEncoders), loaded once per run."""

    vae: object
    text: object  # t2i.interop.models.TextEncoders
    empty_zeros: bool = False  # SDXL's force_zeros_for_empty_prompt: the empty prompt's conditioning is zeros

    @classmethod
    def load(cls, model_dir, config) -> "Encoders":
        from t2i.interop import models

        vae = models.load_vae(model_dir, config.revision, config.variant, models.DTYPES[config.vae_precision])
        text = models.TextEncoders.load(model_dir, config.revision, config.variant,
                                        models.DTYPES[config.mixed_precision])
        return cls(vae, text, text.sdxl and models.force_zeros_for_empty_prompt(model_dir))


def time_ids(original_size, resolution, corners, random_flip: bool) -> np.ndarray:
    """SDXL's size conditioning of each stored view (V, 6): original (h, w), the crop's top-left (y, x) and the target
    (h, w), as diffusers' SDXL script builds add_time_ids; the flipped view of a crop is the crop of the mirrored
    resized image, whose left edge is at resized width - left - target width."""
    width, height = original_size
    target_w, target_h = target_size(resolution)
    resized_w, _ = resized_size(original_size, resolution)
    views = []
    for top, left in corners:
        views.append((height, width, top, left, target_h, target_w))
        if random_flip:
            views.append((height, width, top, resized_w - left - target_w, target_h, target_w))
    return np.array(views, np.int32)


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
    store.note_update(skipped)
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


def crop_views(sample, data: bytes, img, config, size=None):
    """The decoded image's crops as the store keeps them: (pixels (N, 3, H, W) of N crops, their top-left corners,
    SDXL's time ids of its views); `size` is an aspect bucket's (width, height), None for config.resolution's
    square."""
    # The hash of the bytes actually encoded, in case the file changed since it was listed.
    sample.content_hash = content_hash([data], sample.captions)
    # Random crops are seeded per sample so that a re-run (or a resumed kill -9) reproduces them.
    rng = random.Random(f"{config.seed}:{sample.id}")
    resolution = size or config.resolution
    views = crops(img, resolution, config.center_crop, config.num_crops, rng)
    corners = [corner for _, corner in views]
    return (np.stack([to_array(crop) for crop, _ in views]), corners,
            time_ids(img.size, resolution, corners, config.random_flip))


def encode_batch(encoders: Encoders, batch, pixels: np.ndarray, config, width: int) -> Rows:
    """The store rows of batch = [(slot, sample)]: moments, text states (and SDXL's pooled embeddings) padded to
    `width` captions, and caption counts, in the store dtype (time ids are the caller's)."""
    dtype = np.dtype(STORE_DTYPES[config.store_dtype])
    moments = encode_views(encoders.vae, pixels, config.random_flip)
    with np.errstate(over="ignore"):  # an fp16 overflow becomes inf, which the caller's finiteness check reports
        moments = moments.astype(dtype)
    captions = [c for _, s in batch for c in s.captions]
    states, pooled = encoders.text.encode(captions)
    text = np.zeros((len(batch), width) + states.shape[1:], dtype)
    pooled_rows = None if pooled is None else np.zeros((len(batch), width) + pooled.shape[1:], dtype)
    counts, pos = [], 0
    for i, (_, s) in enumerate(batch):
        n = len(s.captions)
        text[i, :n] = states[pos : pos + n]
        if pooled is not None:
            pooled_rows[i, :n] = pooled[pos : pos + n]
        pos += n
        counts.append(n)
    return Rows(moments, text, np.array(counts, np.int32), pooled_rows)


def encode_empty_prompt(encoders: Encoders, config) -> tuple:
    """(text states, SDXL's pooled embedding or None) of the empty prompt, what t2i-train's
    --caption_dropout_probability trains on, in the store dtype: the encoding of "", or zeros where SDXL's
    force_zeros_for_empty_prompt says so (as its pipeline's unconditional branch)."""
    dtype = STORE_DTYPES[config.store_dtype]
    states, pooled = encoders.text.encode([""])
    if encoders.empty_zeros:
        states, pooled = np.zeros_like(states), np.zeros_like(pooled)
    return states[0].astype(dtype), None if pooled is None else pooled[0].astype(dtype)


def encode_into(store: LatentStore, encode, encoders: Encoders, config, skipped, size=None) -> int:
    """Encode encode = [(slot, sample)] into their slots, batch by batch, cropped to `size` (see crop_views); returns
    how many rows were written.

    A sample that cannot be read, or whose latents or text states are not finite, is appended to `skipped` and its
    slot released.
    """
    encoded, released = 0, []
    bar = tqdm(total=len(encode), desc="precompute", unit="img", disable=not encode)
    for b in range(0, len(encode), config.batch_size):
        part = encode[b : b + config.batch_size]
        batch, pixels, corners, view_ids = [], [], [], []
        for slot, s in part:
            try:
                data, img = read_image(s, config.max_image_pixels)
            except ValueError as e:
                skipped.append({"id": s.id, "reason": str(e)})
                released.append(slot)
                continue
            views, corner, ids = crop_views(s, data, img, config, size)
            batch.append((slot, s))
            pixels.append(views)
            corners.append(corner)
            view_ids.append(ids)
        bar.update(len(part) - len(batch))
        if not batch:
            continue
        rows = encode_batch(encoders, batch, np.stack(pixels), config, store["text_states"].shape[1])
        if store.sdxl:
            rows.time_ids = np.stack(view_ids)
        # Checked after the cast to the store dtype: a value that overflows fp16 is as unusable as a NaN.
        keep = np.array([all(np.isfinite(a[i]).all() for a in rows.arrays()) for i in range(len(batch))])
        for (slot, s), ok in zip(batch, keep):
            if not ok:
                skipped.append({"id": s.id, "reason": "non-finite latents or text states (try --vae_precision fp32)"})
                released.append(slot)
        kept = [pair for pair, ok in zip(batch, keep) if ok]
        store.write_complete([slot for slot, _ in kept], Rows(*(a[keep] for a in rows.arrays())),
                             np.array(corners, np.int32)[keep], [s.id for _, s in kept],
                             [s.content_hash for _, s in kept])
        encoded += len(kept)
        bar.update(len(batch))
    bar.close()
    # A changed sample that now fails keeps no claim on its slot (its `done` is already false).
    release_slots(store, released)
    return encoded
