"""Precompute shards (data parallel; not zarr's shard files, see t2i/store.py): where each shard's store lives, and
the merge that fills the main store from them.

zarr rewrites a whole shard file to change a row of it, so processes writing rows of one store would lose each
other's updates. Precompute shard k of N (`--num_shards N --shard_id k`) therefore encodes samples k, k+N, k+2N, ...
into its own ordinary store `<output_dir>.shards/shard-k-of-N.zarr`, and one later run with `--merge_shards N` fills
the store at --output_dir, copying each row a finished shard store holds with the same content hash and encoding only
the rest.
"""

from pathlib import Path

import numpy as np

from t2i.data.store import LatentStore, Rows, StoreError, StoreIdentity


def shard_path(output_dir, shard_id: int, num_shards: int) -> Path:
    root = Path(output_dir)
    return root.with_name(root.name + ".shards") / f"shard-{shard_id}-of-{num_shards}.zarr"


def open_shards(output_dir, merge_shards: int, identity: StoreIdentity) -> list:
    """The shard stores a --merge_shards run copies from, read-only; all must exist and match the main store.

    A missing shard is an error rather than a reason to encode its samples here: it usually means a shard is still
    running or a wrong N, and silently encoding 1/N of the data in one process is what sharding was meant to avoid.
    """
    paths = [shard_path(output_dir, k, merge_shards) for k in range(merge_shards)]
    missing = [str(p) for p in paths if not LatentStore.exists(p)]
    if missing:
        raise StoreError(f"--merge_shards {merge_shards}: no shard store at {', '.join(missing)}; "
                         f"run those shards first (--num_shards {merge_shards} --shard_id K)")
    shards = [LatentStore.open(p, flag="--merge_shards") for p in paths]
    for path, shard in zip(paths, shards):
        detail = identity.mismatch(shard.attrs, arrow="!=")
        if detail:
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


def copy_from_shards(store: LatentStore, todo, shards) -> set:
    """Of todo = [(slot, sample)], copy each sample a shard finished with the same content hash into its slot; returns
    the slots copied."""
    held = shard_rows(shards)
    copies = [(slot, *held[s.id][:2]) for slot, s in todo if s.id in held and held[s.id][2] == s.content_hash]
    copy_rows(store, copies, shards)
    return {slot for slot, _, _ in copies}


def copy_rows(store: LatentStore, copies, shards):
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
    per_caption = store.caption_arrays()  # as wide as the store's caption axis (width)
    for b in range(0, len(copies), batch_rows):
        batch = copies[b : b + batch_rows]
        n = len(batch)
        arrays = {name: np.zeros((n, width) + store[name].shape[2:] if name in per_caption else
                                 (n,) + store[name].shape[1:], store[name].dtype) for name in store.row_arrays()}
        crop = np.zeros((n,) + store["crop"].shape[1:], np.int32)
        sample_ids, content_hashes = [""] * n, [""] * n
        for k, shard in enumerate(shards):
            rows = [i for i, (_, src, _) in enumerate(batch) if src == k]
            if not rows:
                continue
            src_slots = np.array([batch[i][2] for i in rows])
            read = shard.read(src_slots)
            for name, values in zip(shard.row_arrays(), read.arrays()):
                if name in per_caption:
                    # The shard's caption axis can be wider or narrower than the main one; rows beyond num_captions
                    # are zero.
                    cols = min(width, values.shape[1])
                    arrays[name][rows, :cols] = values[:, :cols]
                else:
                    arrays[name][rows] = values
            crop[rows] = crops[k][src_slots]
            for i, slot in zip(rows, src_slots):
                sample_ids[i], content_hashes[i] = str(ids[k][slot]), str(hashes[k][slot])
        store.write_complete([slot for slot, _, _ in batch], Rows(*arrays.values()), crop, sample_ids, content_hashes)
