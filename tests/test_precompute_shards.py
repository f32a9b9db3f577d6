import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import BUCKETS, write_subset
from PIL import Image

from t2i.data.shards import shard_path
from t2i.data.store import LatentStore, StoreError, bucket_group
from t2i.demo.shapes import render
from t2i.precompute import PrecomputeConfig, cli, run

RES = 32


def config(model, out, data, **overrides):
    kwargs = {"pretrained_model_name_or_path": str(model), "train_data_dir": str(data), "output_dir": str(out),
              "resolution": RES, "batch_size": 2, "chunk_rows": 2, "random_flip": True}
    return PrecomputeConfig(**{**kwargs, **overrides})


def write_imagefolder(folder: Path, rows):
    folder.mkdir(parents=True, exist_ok=True)
    for name, image, _ in rows:
        image.save(folder / name)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, _, t in rows))
    return folder


def image(i):
    """Non-square, so the random crop has room to move and a crop taken elsewhere would change the latents."""
    colour, shape = [("red", "circle"), ("green", "square"), ("blue", "triangle")][i % 3]
    return render(colour, shape, np.random.default_rng(i), 48).resize((48 + 8 * (i % 3), 48), Image.BILINEAR)


# Seven samples over two shards (4 + 3); one has three captions so the caption axes of the shards differ.
ROWS = [(f"{i}.png", image(i), f"caption {i}") for i in range(7)]
ROWS[4] = ("4.png", image(4), ["a", "b", "c"])


def contents(root):
    """sample_id -> every per-sample array of its row, for the complete rows."""
    store = LatentStore.open(root)
    slots = store.valid_slots()
    rows = store.read(slots)
    moments, text, counts = rows.moments, rows.text, rows.counts
    crops, hashes, done = store["crop"][:], store["content_hash"][:], store["done"][:]
    ids = store["sample_id"][:]
    return {str(ids[s]): {"moments": moments[i], "text_states": text[i], "num_captions": counts[i],
                          "crop": crops[s], "content_hash": str(hashes[s]), "done": done[s]}
            for i, s in enumerate(slots)}


# A shard encodes each image in a batch of other neighbours than the single run does, and batched float kernels round
# differently with batch composition (seen: 2.4e-07 on 2 of 4096 elements), which can flip the last bit of the fp16
# the store keeps: latents and text states agree within one fp16 step (relative 2^-10), every other field exactly.
# A wrong crop, flip or caption moves them by far more (> 1e-2).
FP16_STEP = 2.0**-10


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for sid in want:
        for key in want[sid]:
            if key in ("moments", "text_states"):
                np.testing.assert_allclose(np.float32(got[sid][key]), np.float32(want[sid][key]), rtol=FP16_STEP,
                                           atol=1e-6, err_msg=f"{sid} {key}")
            else:
                np.testing.assert_array_equal(got[sid][key], want[sid][key], err_msg=f"{sid} {key}")


@pytest.fixture(scope="module")
def sharded(tiny_model, tmp_path_factory):
    """The data encoded as 2 shards (one through run(), one through the console flags) and in a single process."""
    base = tmp_path_factory.mktemp("shards")
    data = write_imagefolder(base / "data", ROWS)
    out = base / "merged.zarr"
    assert run(config(tiny_model, out, data, num_shards=2, shard_id=0))["encoded"] == 4
    result = CliRunner().invoke(cli, [
        "--pretrained_model_name_or_path", str(tiny_model), "--train_data_dir", str(data), "--output_dir", str(out),
        "--resolution", str(RES), "--batch_size", "2", "--chunk_rows", "2", "--random_flip",
        "--num_shards", "2", "--shard_id", "1",
    ])
    assert result.exit_code == 0, result.output
    assert "3 encoded" in result.stdout
    single = base / "single.zarr"
    run(config(tiny_model, single, data))
    return data, out, contents(single)


def test_shards_hold_their_samples_only(sharded):
    _, out, _ = sharded
    assert not out.exists()
    ids = [name for name, _, _ in ROWS]
    for k in range(2):
        path = out.parent / "merged.zarr.shards" / f"shard-{k}-of-2.zarr"
        assert shard_path(out, k, 2) == path
        assert sorted(contents(path)) == sorted(ids[k::2])


def test_merge_copies_every_row_and_equals_single_run(tiny_model, sharded):
    data, out, single = sharded
    summary = run(config(tiny_model, out, data, merge_shards=2))
    assert (summary["copied"], summary["encoded"], summary["num_samples"]) == (7, 0, 7)
    assert_same(contents(out), single)
    assert LatentStore.open(out)["text_states"].shape[1] == 3
    again = run(config(tiny_model, out, data, merge_shards=2))
    assert (again["copied"], again["encoded"], again["unchanged"]) == (0, 0, 7)


def test_merge_encodes_only_what_no_shard_holds(tiny_model, sharded, tmp_path):
    data, out, _ = sharded
    shards = tmp_path / "merged.zarr.shards"
    shutil.copytree(out.parent / "merged.zarr.shards", shards)
    # A shard killed before one row's done flag, a caption changed after the shards ran, and a new image.
    killed = LatentStore.open(shards / "shard-0-of-2.zarr", mode="r+")
    killed["done"][killed.index()["2.png"][0]] = False
    rows = ROWS[:3] + [("3.png", ROWS[3][1], "a changed caption")] + ROWS[4:] + [("new.png", image(9), "new")]
    data2 = write_imagefolder(tmp_path / "data", rows)
    summary = run(config(tiny_model, tmp_path / "merged.zarr", data2, merge_shards=2))
    assert (summary["copied"], summary["encoded"]) == (5, 3)
    run(config(tiny_model, tmp_path / "single.zarr", data2))
    assert_same(contents(tmp_path / "merged.zarr"), contents(tmp_path / "single.zarr"))


def test_shard_flags_are_checked(tiny_model, sharded, tmp_path):
    data, out, _ = sharded
    for overrides, message in [
        ({"num_shards": 0}, "--num_shards must be at least 1, got 0"),
        ({"num_shards": 2, "shard_id": 2}, "--shard_id must be in 0..1 for --num_shards 2, got 2"),
        ({"shard_id": -1}, "--shard_id must be at least 0, got -1"),
        ({"merge_shards": 2, "num_shards": 2}, "--merge_shards runs in one process after the shards"),
    ]:
        with pytest.raises(ValueError, match=message):
            config(tiny_model, out, data, **overrides)
    result = CliRunner().invoke(cli, ["--pretrained_model_name_or_path", str(tiny_model), "--train_data_dir",
                                      str(data), "--output_dir", str(out), "--num_shards", "2", "--shard_id", "5"])
    assert result.exit_code == 2
    assert result.stderr == "error: --shard_id must be in 0..1 for --num_shards 2, got 5\n"

    with pytest.raises(StoreError, match=r"--merge_shards 3: no shard store at .*shard-2-of-3\.zarr; run those"):
        run(config(tiny_model, tmp_path / "x.zarr", data, merge_shards=3))
    shutil.copytree(out.parent / "merged.zarr.shards", tmp_path / "y.zarr.shards")
    with pytest.raises(StoreError, match=r"shard-0-of-2\.zarr: shard store was built with different settings "
                                         r"\(center_crop False != True\); re-run that shard"):
        run(config(tiny_model, tmp_path / "y.zarr", data, merge_shards=2, center_crop=True))
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()


def test_shards_of_aspect_buckets(tiny_model, mixed_data, tmp_path):
    """Shards encode each image at its own bucket; the merge copies their rows, merges the buckets that the whole data
    set leaves smaller than --min_bucket_size (encoding the samples it moves, which no shard holds at that size) and
    equals a single run."""
    rows = [json.loads(line) for line in (mixed_data / "metadata.jsonl").read_text().splitlines()]
    # All square and tall images, 3 of the 12 wide ones (make_demo_data's rounds: square, wide, tall).
    data = write_subset(mixed_data, rows[:15] + rows[24:], tmp_path / "data")
    out = tmp_path / "merged.zarr"
    kw = dict(pretrained_model_name_or_path=str(tiny_model), train_data_dir=str(data), center_crop=True,
              random_flip=True, batch_size=4, min_bucket_size=4, **BUCKETS)
    for k in range(2):
        run(PrecomputeConfig(**kw, output_dir=str(out), num_shards=2, shard_id=k))
    # Samples 12 and 14 in shard 0, 13 in shard 1: each shard keeps its too small wide bucket.
    wide = [LatentStore.open(shard_path(out, k, 2)).part((40, 24)) for k in range(2)]
    assert [len(part.valid_slots()) for part in wide] == [2, 1]
    summary = run(PrecomputeConfig(**kw, output_dir=str(out), merge_shards=2))
    assert (summary["copied"], summary["encoded"], summary["num_samples"]) == (24, 3, 27)
    single = tmp_path / "single.zarr"
    run(PrecomputeConfig(**kw, output_dir=str(single)))
    assert [size for size, _ in LatentStore.open(out).parts()] == [(24, 40), (32, 32)]
    for size in ((24, 40), (32, 32)):
        assert_same(contents(out / bucket_group(size)), contents(single / bucket_group(size)))
    assert len(contents(out / bucket_group((32, 32)))) == 15
