"""The data set precompute reads: which rows --max_train_samples keeps, duplicate ids, and EXIF-rotated images."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from t2i.data.dataset import load_samples
from t2i.data.images import decode_image


def imagefolder(path, rows):
    """An imagefolder of 4x4 PNGs, one per distinct file_name of `rows` (metadata lines, written as given)."""
    path.mkdir()
    for k, name in enumerate(dict.fromkeys(r["file_name"] for r in rows)):
        Image.new("RGB", (4, 4), (10 * k, 0, 0)).save(path / name)
    (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def numbered(path, n):
    return imagefolder(path, [{"file_name": f"{i:02d}.png", "text": f"image {i}"} for i in range(n)])


def test_max_train_samples_keeps_the_seeded_choice_in_data_set_order(tmp_path):
    """--max_train_samples N keeps the rows the seed script keeps: default_rng(seed).permutation(len)[:N], in the
    data set's order."""
    data = numbered(tmp_path / "data", 8)
    ids = [s.id for s in load_samples(train_data_dir=data)]
    assert ids == [f"{i:02d}.png" for i in range(8)]
    chosen = {}
    for seed in (0, 1):
        kept = load_samples(train_data_dir=data, max_train_samples=3, seed=seed)
        expected = [ids[i] for i in sorted(np.random.default_rng(seed).permutation(8)[:3])]
        assert [s.id for s in kept] == expected
        assert [s.captions for s in kept] == [[f"image {int(i[:2])}"] for i in expected]
        chosen[seed] = expected
    assert chosen[0] == ["02.png", "03.png", "04.png"]  # the permutation's order is 2, 4, 3: kept in data set order
    assert set(chosen[0]) != set(chosen[1])  # another seed, another choice
    # N at or over the data set's size keeps every row.
    assert [s.id for s in load_samples(train_data_dir=data, max_train_samples=8, seed=1)] == ids


def test_a_file_named_twice_is_skipped_as_a_duplicate_with_an_id_of_its_own(tmp_path):
    rows = [{"file_name": "a.png", "text": "first"}, {"file_name": "b.png", "text": "b"},
            {"file_name": "a.png", "text": "second"}]
    samples = load_samples(train_data_dir=imagefolder(tmp_path / "data", rows))
    assert len(samples) == 3
    first, b, second = samples
    assert (first.id, first.error, first.captions) == ("a.png", None, ["first"])
    assert b.error is None
    assert second.error == "duplicate id"
    assert second.id not in ("a.png", "b.png")
    assert len({s.id for s in samples}) == 3


def jpeg(img, orientation=None):
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation  # Orientation
    img.save(buf, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())  # 4:4:4: no colour bleed between blocks
    return buf.getvalue()


COLOURS = {"R": (255, 0, 0), "G": (0, 255, 0), "B": (0, 0, 255)}


def assert_blocks(img, rows):
    """Each 8x8 block of `img` is the colour its letter in `rows` names (judged on its middle 4x4 pixels)."""
    a = np.asarray(img, np.float64)
    assert a.shape[:2] == (8 * len(rows), 8 * len(rows[0]))
    got = [["" for _ in row] for row in rows]
    for r, row in enumerate(rows):
        for c, letter in enumerate(row):
            mean = a[8 * r + 2: 8 * r + 6, 8 * c + 2: 8 * c + 6].mean((0, 1))
            got[r][c] = next((k for k, v in COLOURS.items() if np.abs(mean - v).max() < 24), "?")
    assert ["".join(row) for row in got] == rows


@pytest.mark.parametrize("orientation, shown", [(6, ["RG", "RR", "BB", "BB"]), (8, ["BB", "BB", "RR", "GR"])])
def test_exif_orientation_rotates_the_decoded_image(orientation, shown):
    """A 32x16 JPEG, left half red and right half blue with a green top-left corner, stored with EXIF Orientation 6
    (shown turned 90 degrees clockwise) or 8 (counter-clockwise), decodes as the 16x32 image a viewer shows: for 6 red
    on top with the green corner top right, for 8 red below with the green corner bottom left."""
    img = Image.new("RGB", (32, 16), COLOURS["B"])
    img.paste(COLOURS["R"], (0, 0, 16, 16))
    img.paste(COLOURS["G"], (0, 0, 8, 8))
    plain = decode_image(jpeg(img), max_pixels=10_000)
    assert plain.size == (32, 16)
    assert_blocks(plain, ["GRBB", "RRBB"])  # no EXIF: as stored
    rotated = decode_image(jpeg(img, orientation), max_pixels=10_000)
    assert rotated.mode == "RGB"
    assert rotated.size == (16, 32)
    assert_blocks(rotated, shown)
