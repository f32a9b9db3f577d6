"""The captioned image set precompute reads: an HF imagefolder or a `datasets` dataset, as a list of `Sample` rows.

Each row carries its captions, a content hash and a way to read its image bytes, or the reason it is skipped; the
bytes themselves are read only when the row is encoded.
"""

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from t2i.core.cli import first_line


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
    """Rows of a `datasets` dataset (a `save_to_disk` folder, or a name/path `load_dataset` understands: a Hub dataset
    id is downloaded into, or read offline from, `datasets`' own cache)."""
    import datasets

    path = Path(name)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    except ConnectionError as e:  # datasets' word for "offline (HF_HUB_OFFLINE=1 or no network) and not cached"
        raise ValueError(
            f"--dataset_name {name}: not in the datasets cache {cache_dir or datasets.config.HF_DATASETS_CACHE} and "
            f"the Hub cannot be reached ({first_line(e)}); run once with network to download it, or pass a local "
            "--train_data_dir"
        ) from None
    except Exception as e:  # datasets raises a dozen unrelated types (missing files, hub errors, bad configs)
        raise ValueError(f"--dataset_name {name}: cannot load it ({first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"--dataset_name {name}: no 'train' split; splits are {', '.join(ds)}")
        ds = ds["train"]
    source = Path(ds.cache_files[0]["filename"]).parent if ds.cache_files else "memory"
    print(f"--dataset_name {name}: {len(ds)} rows from {source}")
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


def load_samples(train_data_dir=None, dataset_name=None, dataset_config_name=None, cache_dir=None, image_column="image",
                 caption_column="text", max_train_samples=None, seed=0):
    """Every row of the data set (an imagefolder, or a `datasets` dataset) in a fixed order, each usable or with the
    reason it is skipped; an error when none is usable. --max_train_samples keeps a seeded choice of rows."""
    if train_data_dir is not None:
        samples = read_imagefolder(train_data_dir, image_column, caption_column)
    else:
        samples = read_hf_dataset(dataset_name, dataset_config_name, cache_dir, image_column, caption_column)
    seen = set()
    for s in samples:
        if s.error is None and not s.captions:
            s.error = f"missing caption (column {caption_column!r})"
        if s.id in seen:
            s.error, s.id = "duplicate id", f"{s.id}#dup{len(seen)}"
        seen.add(s.id)
    if max_train_samples is not None and max_train_samples < len(samples):
        # As the seed script: a seeded shuffle, then the first N.
        order = np.random.default_rng(seed).permutation(len(samples))[:max_train_samples]
        samples = [samples[i] for i in sorted(order)]
    if all(s.error for s in samples):
        first = f"; first: {samples[0].id}: {samples[0].error}" if samples else ""
        raise ValueError(f"no usable samples in {train_data_dir or dataset_name} "
                         f"({len(samples)} rows, all skipped{first})")
    return samples
