import datetime
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

import t2i
from t2i.data.store import SCHEMA_VERSION, LatentStore, StoreError
from t2i.demo.shapes import make_demo_data, render
from t2i.interop import models
from t2i.precompute import PrecomputeConfig, cli, run

RES = 32


def config(model, out, data=None, **overrides):
    kwargs = {"pretrained_model_name_or_path": str(model), "output_dir": str(out), "resolution": RES, "batch_size": 4}
    if "dataset_name" not in overrides:
        kwargs["train_data_dir"] = str(data)
    return PrecomputeConfig(**{**kwargs, **overrides})


def write_imagefolder(folder: Path, rows):
    """rows: (file_name, PIL image | raw bytes | None for no file, metadata row extras)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, image, extra in rows:
        if isinstance(image, Image.Image):
            image.save(folder / name)
        elif image is not None:
            (folder / name).write_bytes(image)
        lines.append(json.dumps({"file_name": name, **extra}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def noise_image(seed, width, height):
    """Detail everywhere, so a crop or resize that is off by one pixel changes the latents."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def shape_image(i, size=64):
    colour, shape = [("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "circle")][i % 4]
    return render(colour, shape, np.random.default_rng(i), size)


def resize_short_side(img: Image.Image, res=RES) -> Image.Image:
    """torchvision.transforms.Resize(res) on a PIL image: short side to res, long side truncated."""
    w, h = img.size
    size = (res, int(res * h / w)) if w <= h else (int(res * w / h), res)
    return img.resize(size, Image.BILINEAR)


def crop_at(img: Image.Image, top, left, res=RES) -> np.ndarray:
    return np.asarray(img.crop((left, top, left + res, top + res)))


@pytest.fixture(scope="module")
def encoders(tiny_model):
    vae = models.load_vae(tiny_model)
    tokenizer, text_encoder = models.load_text_encoder(tiny_model)
    return vae, tokenizer, text_encoder


def encode_pixels(vae, rgb: np.ndarray) -> np.ndarray:
    import mindspore as ms

    x = rgb.astype(np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
    return vae.encode(ms.Tensor(x))[0].asnumpy()[0]


def encode_captions(encoders, captions) -> np.ndarray:
    _, tokenizer, text_encoder = encoders
    return models.encode_text(tokenizer, text_encoder, captions).asnumpy()


def assert_fp16_close(stored, expected):
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def by_id(root):
    """sample_id -> (moments, text_states, num_captions, crops, content_hash) for every complete slot."""
    store = LatentStore.open(root)
    slots = store.valid_slots()
    rows = store.read(slots)
    moments, text, counts = rows.moments, rows.text, rows.counts
    ids, crops, hashes = store["sample_id"][:], store["crop"][:], store["content_hash"][:]
    return {str(ids[s]): (moments[i], text[i], counts[i], crops[s], str(hashes[s])) for i, s in enumerate(slots)}


# Non-square images give the random crop room to move; one sample has three captions, so captions are ragged.
MAIN_ROWS = [
    ("wide.png", lambda: noise_image(0, 80, 48), {"text": "a red circle"}),
    ("tall.png", lambda: noise_image(1, 40, 72), {"text": ["a green square"]}),
    ("many.png", lambda: shape_image(2), {"text": ["a blue triangle", "a small blue triangle", "yoda"]}),
    ("sq0.png", lambda: shape_image(3), {"text": "a yellow circle"}),
    ("sq1.png", lambda: shape_image(4), {"text": "a large red circle"}),
]


@pytest.fixture(scope="module")
def main_store(tiny_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("main")
    data = write_imagefolder(base / "data", [(n, make(), extra) for n, make, extra in MAIN_ROWS])
    summary = run(config(tiny_model, base / "store", data, random_flip=True, chunk_rows=2))
    return data, base / "store", summary


def test_store_matches_direct_encode(main_store, encoders, tiny_model):
    data, root, summary = main_store
    assert summary["encoded"] == len(MAIN_ROWS) and summary["skipped"] == [] and summary["num_samples"] == 5
    store = LatentStore.open(root)
    attrs = store.attrs
    vae_config = json.loads((tiny_model / "vae" / "config.json").read_text())
    assert attrs["schema_version"] == SCHEMA_VERSION == 2
    assert attrs["model_fingerprint"] == models.fingerprint(tiny_model)
    assert attrs["vae_scaling_factor"] == vae_config["scaling_factor"] == store.scaling_factor
    assert (attrs["resolution"], attrs["center_crop"], attrs["random_flip"], attrs["num_crops"],
            attrs["store_dtype"]) == (RES, False, True, 1, "fp16")
    assert attrs["skipped"] == [] and attrs["tool_version"] == t2i.__version__
    assert datetime.datetime.fromisoformat(attrs["created"]).tzinfo is not None
    assert store.chunk_rows == 2 and store["moments"].shape[1:] == (2, 8, RES // 2, RES // 2)
    # Two rows per shard file, each row an inner chunk of its own: 5 samples are 3 files of moments.
    assert store["moments"].shards[0] == 2 and store["moments"].chunks[0] == 1
    assert sorted(p.name for p in (root / "moments" / "c").iterdir()) == ["0", "1", "2"]

    index = store.index()
    assert sorted(index) == sorted(name for name, _, _ in MAIN_ROWS)
    vae = encoders[0]
    crops = set()
    for name, _, extra in MAIN_ROWS:
        slot, content_hash, done = index[name]
        assert done
        captions = extra["text"] if isinstance(extra["text"], list) else [extra["text"]]
        image_bytes = (data / name).read_bytes()
        assert content_hash == hashlib.sha256(image_bytes + json.dumps(captions).encode()).hexdigest()
        resized = resize_short_side(Image.open(data / name).convert("RGB"))
        top, left = (int(v) for v in store["crop"][slot, 0])
        assert 0 <= top <= resized.height - RES and 0 <= left <= resized.width - RES
        crops.add((top, left))
        moments = store.read([slot]).moments
        assert_fp16_close(moments[0, 0], encode_pixels(vae, crop_at(resized, top, left)))
    # The wide and tall images were cropped somewhere other than the corner (seeded, so this is stable).
    assert len(crops) > 1


def test_flip_view_is_the_mirrored_crop(main_store, encoders):
    data, root, _ = main_store
    store = LatentStore.open(root)
    for name in ("wide.png", "tall.png", "sq0.png"):
        slot = store.index()[name][0]
        top, left = (int(v) for v in store["crop"][slot, 0])
        crop = crop_at(resize_short_side(Image.open(data / name).convert("RGB")), top, left)
        moments = store.read([slot]).moments
        assert_fp16_close(moments[0, 1], encode_pixels(encoders[0], crop[:, ::-1]))
        assert not np.allclose(moments[0, 0], moments[0, 1], atol=1e-2)


def test_every_caption_is_kept_and_encoded(main_store, encoders):
    _, root, _ = main_store
    store = LatentStore.open(root)
    assert store["text_states"].shape[1] == 3
    index = store.index()
    slots = [index[name][0] for name, _, _ in MAIN_ROWS]
    rows = store.read(slots)
    text, counts = rows.text, rows.counts
    for (name, _, extra), states, n in zip(MAIN_ROWS, text, counts):
        captions = extra["text"] if isinstance(extra["text"], list) else [extra["text"]]
        assert n == len(captions), name
        assert_fp16_close(states[:n], encode_captions(encoders, captions))
        assert not states[n:].any()


def test_num_crops_stores_each_crop_and_its_flip(main_store, encoders, tiny_model, tmp_path):
    data, single_root, _ = main_store
    out = tmp_path / "crops.zarr"
    assert run(config(tiny_model, out, data, random_flip=True, num_crops=3))["encoded"] == len(MAIN_ROWS)
    store, single = LatentStore.open(out), LatentStore.open(single_root)
    assert store.attrs["num_crops"] == 3 and store.attrs["views"].startswith("view = crop * 2 + flipped")
    assert store["moments"].shape[1] == 6 and store["crop"].shape[1:] == (3, 2)
    for name in ("wide.png", "tall.png", "sq0.png"):
        slot = store.index()[name][0]
        corners = [tuple(int(v) for v in c) for c in store["crop"][slot]]
        # Crop 0 is the crop a single-crop run with the same seed takes.
        assert corners[0] == tuple(int(v) for v in single["crop"][single.index()[name][0], 0])
        resized = resize_short_side(Image.open(data / name).convert("RGB"))
        moments = store.read([slot]).moments[0]
        for c, (top, left) in enumerate(corners):
            crop = crop_at(resized, top, left)
            assert_fp16_close(moments[2 * c], encode_pixels(encoders[0], crop))
            assert_fp16_close(moments[2 * c + 1], encode_pixels(encoders[0], crop[:, ::-1]))
        if name == "sq0.png":  # square: one crop position only
            assert corners == [(0, 0)] * 3
        else:
            assert len(set(corners)) == 3, corners
            for a in range(3):
                for b in range(a + 1, 3):
                    assert not np.allclose(moments[2 * a], moments[2 * b], atol=1e-2), (name, a, b)

    # The number of crops is part of the store's identity: a different one means re-encoding everything.
    with pytest.raises(StoreError, match=r"num_crops 3 -> 2\); pass --overwrite to rebuild"):
        run(config(tiny_model, out, data, random_flip=True, num_crops=2))
    rebuilt = run(config(tiny_model, out, data, random_flip=True, num_crops=2, overwrite=True))
    assert rebuilt["encoded"] == len(MAIN_ROWS)
    assert LatentStore.open(out)["crop"].shape[1:] == (2, 2)


def test_merged_shards_keep_every_crop(tiny_model, tmp_path):
    rows = [(f"{i}.png", noise_image(i, 48 + 8 * i, 40), {"text": f"caption {i}"}) for i in range(3)]
    data = write_imagefolder(tmp_path / "data", rows)
    out = tmp_path / "merged.zarr"
    for k in range(2):
        run(config(tiny_model, out, data, num_crops=2, num_shards=2, shard_id=k))
    assert run(config(tiny_model, out, data, num_crops=2, merge_shards=2))["copied"] == 3
    run(config(tiny_model, tmp_path / "single.zarr", data, num_crops=2))
    merged, single = by_id(out), by_id(tmp_path / "single.zarr")
    assert sorted(merged) == sorted(single) == [name for name, _, _ in rows]
    for sid in single:
        assert merged[sid][3].shape == (2, 2)
        np.testing.assert_array_equal(merged[sid][3], single[sid][3])
        # Shards encode other batches than the single run, and batched kernels round differently: one fp16 step.
        np.testing.assert_allclose(merged[sid][0].astype(np.float32), single[sid][0].astype(np.float32),
                                   rtol=2.0**-10, atol=1e-6)


def test_num_crops_flag_is_checked(tiny_model, tmp_path):
    data = make_demo_data(tmp_path / "data", num_images=2)
    for flags, message in [
        (["--center_crop", "--num_crops", "2"], "--num_crops 2 needs random crops: --center_crop takes the same crop "
                                                "every time; drop one of them"),
        (["--num_crops", "0"], "--num_crops must be at least 1, got 0"),
    ]:
        result = CliRunner().invoke(cli, ["--pretrained_model_name_or_path", str(tiny_model), "--train_data_dir",
                                          str(data), "--output_dir", str(tmp_path / "never"), *flags])
        assert result.exit_code == 2
        assert result.stderr == f"error: {message}\n"
    assert not (tmp_path / "never").exists()


def test_store_of_another_schema_is_refused_with_a_way_out(tiny_model, tmp_path):
    data = make_demo_data(tmp_path / "data", num_images=2)
    out = tmp_path / "store"
    cfg = config(tiny_model, out, data, center_crop=True)
    run(cfg)
    # What a schema-1 store looks like to this version: its version number, and no num_crops attribute.
    group = zarr.open_group(str(out), mode="r+")
    group.attrs["schema_version"] = 1
    del group.attrs["num_crops"]
    with pytest.raises(StoreError) as refused:
        LatentStore.open(out)
    assert str(refused.value) == (f"{out}: store schema version 1, this t2i reads 2 and 3; "
                                  "re-run t2i-precompute with --overwrite")
    with pytest.raises(StoreError, match=r"schema_version 1 -> 2, num_crops None -> 1\); pass --overwrite to rebuild"):
        run(cfg)
    assert run(config(tiny_model, out, data, center_crop=True, overwrite=True))["encoded"] == 2
    assert LatentStore.open(out).attrs["schema_version"] == 2


def test_incremental_rerun_encodes_only_changes(tiny_model, tmp_path, encoders):
    rows = [(f"{i}.png", shape_image(i), {"text": f"caption {i}"}) for i in range(6)]
    data = write_imagefolder(tmp_path / "data", rows)
    cfg = config(tiny_model, tmp_path / "store", data, center_crop=True)
    assert run(cfg)["encoded"] == 6
    before = by_id(cfg.output_dir)
    slot_of = {sid: slot for sid, (slot, _, _) in LatentStore.open(cfg.output_dir).index().items()}

    second = rows[:]
    second[1] = ("1.png", shape_image(11), {"text": "caption 1"})  # new image bytes
    second[2] = ("2.png", rows[2][1], {"text": "a new caption"})
    del second[3]
    second += [("new_a.png", shape_image(20), {"text": "new a"}), ("new_b.png", shape_image(21), {"text": "new b"})]
    shutil.rmtree(data)
    write_imagefolder(data, second)
    summary = run(cfg)
    assert (summary["encoded"], summary["unchanged"], summary["removed"]) == (4, 3, 1)
    after = by_id(cfg.output_dir)
    store = LatentStore.open(cfg.output_dir)
    assert sorted(after) == sorted(name for name, _, _ in second)
    for sid in ("0.png", "4.png", "5.png"):
        for old, new in zip(before[sid], after[sid]):
            np.testing.assert_array_equal(old, new)
        assert store.index()[sid][0] == slot_of[sid]
    assert not np.array_equal(before["1.png"][0], after["1.png"][0])
    assert_fp16_close(after["2.png"][0], before["2.png"][0].astype(np.float32))
    assert_fp16_close(after["2.png"][1][:1], encode_captions(encoders, ["a new caption"]))
    new_b = np.asarray(shape_image(21).resize((RES, RES), Image.BILINEAR))
    assert_fp16_close(after["new_b.png"][0][0], encode_pixels(encoders[0], new_b))
    # The removed sample's slot was handed to a new one rather than growing the store.
    assert store.num_slots == 7 and slot_of["3.png"] in {store.index()[s][0] for s in ("new_a.png", "new_b.png")}

    third = [r for r in second if r[0] != "0.png"]
    shutil.rmtree(data)
    write_imagefolder(data, third)
    (data / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # changed into garbage
    summary = run(cfg)
    assert (summary["encoded"], summary["unchanged"], summary["removed"]) == (0, 5, 1)
    assert [s["id"] for s in summary["skipped"]] == ["5.png"]
    store = LatentStore.open(cfg.output_dir)
    for sid in ("0.png", "5.png"):
        assert slot_of[sid] not in store.valid_slots() and store["sample_id"][slot_of[sid]] == ""
    assert sorted(by_id(cfg.output_dir)) == sorted(r[0] for r in third if r[0] != "5.png")
    assert store.attrs["num_samples"] == 5


def test_crash_mid_write_leaves_rewritten_slot_not_done(tiny_model, tmp_path, monkeypatch):
    rows = [(f"{i}.png", shape_image(i), {"text": f"caption {i}"}) for i in range(3)]
    data = write_imagefolder(tmp_path / "data", rows)
    cfg = config(tiny_model, tmp_path / "store", data, center_crop=True)
    run(cfg)
    before = by_id(cfg.output_dir)
    shape_image(7).save(data / "1.png")

    def crash_after_moments(store, name, slots, values):
        if name == "text_states":
            raise KeyboardInterrupt("killed between the moments and the text states")
        real_write(store, name, slots, values)

    real_write = LatentStore.write
    monkeypatch.setattr(LatentStore, "write", crash_after_moments)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    # 1.png's slot now holds new moments beside old text: it must not count as complete.
    store = LatentStore.open(cfg.output_dir)
    assert sorted(by_id(cfg.output_dir)) == ["0.png", "2.png"]
    assert not store["done"][store.index()["1.png"][0]]

    monkeypatch.setattr(LatentStore, "write", real_write)
    assert run(cfg)["encoded"] == 1
    after = by_id(cfg.output_dir)
    assert not np.allclose(after["1.png"][0].astype(np.float32), before["1.png"][0].astype(np.float32), atol=1e-2)
    np.testing.assert_array_equal(after["0.png"][0], before["0.png"][0])


def done_count(root: Path) -> int:
    if not (root / "done" / "zarr.json").is_file():
        return 0
    return int(zarr.open_array(str(root / "done"), mode="r")[:].sum())


def test_kill_9_mid_run_then_rerun_equals_clean_run(tiny_model, tmp_path):
    data = make_demo_data(tmp_path / "data", num_images=40)
    killed = tmp_path / "killed"
    exe = Path(sys.executable).parent / "t2i-precompute"
    args = [str(exe), "--pretrained_model_name_or_path", str(tiny_model), "--train_data_dir", str(data),
            "--output_dir", str(killed), "--resolution", str(RES), "--random_flip", "--batch_size", "1",
            "--chunk_rows", "8", "--device_target", "CPU"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while done_count(killed) == 0:
            assert proc.poll() is None, "precompute exited before any sample was done"
            assert time.monotonic() < deadline, "no sample done within 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = done_count(killed)
    assert 0 < at_kill < 40

    cfg = config(tiny_model, killed, data, random_flip=True, batch_size=1, chunk_rows=8)
    resumed = run(cfg)
    assert (resumed["encoded"], resumed["unchanged"]) == (40 - at_kill, at_kill)
    clean = run(config(tiny_model, tmp_path / "clean", data, random_flip=True, batch_size=1, chunk_rows=8))
    assert clean["encoded"] == 40
    a, b = by_id(killed), by_id(tmp_path / "clean")
    assert sorted(a) == sorted(b) and len(a) == 40
    for sid in a:
        for x, y in zip(a[sid], b[sid]):
            np.testing.assert_array_equal(x, y)
    assert not list(killed.rglob("*.partial"))


def truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def test_bad_inputs_are_skipped_with_reasons(tiny_model, tmp_path, encoders):
    shape_image(0).save(tmp_path / "outside.png")
    grey = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    grey16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    rgba = np.zeros((32, 48, 4), np.uint8)
    rgba[:, :24] = (200, 30, 30, 255)
    rgba[:, 24:] = (0, 0, 255, 0)  # fully transparent: the hidden blue must not show
    cmyk = Image.new("CMYK", (64, 64), (0, 200, 200, 30))
    rows = [
        ("good.png", shape_image(0), {"text": "a red circle"}),
        ("wide.png", noise_image(0, 59, 32), {"text": "noise"}),
        ("truncated.png", truncated_png(), {"text": "noise"}),
        ("empty.png", b"", {"text": "nothing"}),
        ("notes.png", b"these are my notes, not a picture\n", {"text": "notes"}),
        ("cmyk.jpg", cmyk, {"text": "cmyk"}),
        ("grey.png", Image.fromarray(grey), {"text": "grey"}),
        ("grey16.png", Image.fromarray(grey16), {"text": "grey 16 bit"}),
        ("rgba.png", Image.fromarray(rgba), {"text": "half transparent"}),
        ("nocaption.png", shape_image(1), {}),
        ("blankcaption.png", shape_image(2), {"text": "   "}),
        ("../outside.png", None, {"text": "escape"}),
        ("missing.png", None, {"text": "gone"}),
        ("big.png", Image.new("RGB", (200, 200), (1, 2, 3)), {"text": "too big"}),
    ]
    data = write_imagefolder(tmp_path / "data", rows)
    with open(data / "metadata.jsonl", "a") as f:
        f.write("{not json\n")
    summary = run(config(tiny_model, tmp_path / "store", data, center_crop=True, max_image_pixels=100 * 100))

    store = LatentStore.open(tmp_path / "store")
    reasons = {s["id"]: s["reason"] for s in store.attrs["skipped"]}
    assert store.attrs["skipped"] == summary["skipped"]
    expected = {
        "truncated.png": "unreadable image",
        "empty.png": "empty file",
        "notes.png": "not an image",
        "nocaption.png": "missing caption",
        "blankcaption.png": "missing caption",
        "../outside.png": "outside the data folder",
        "missing.png": "file not found",
        "big.png": "200x200 exceeds the pixel limit 10000 (--max_image_pixels)",
        "metadata.jsonl:15": "invalid JSON",
    }
    assert sorted(reasons) == sorted(expected)
    for sid, words in expected.items():
        assert words in reasons[sid], (sid, reasons[sid])

    index = store.index()
    kept = ["good.png", "wide.png", "cmyk.jpg", "grey.png", "grey16.png", "rgba.png"]
    assert sorted(index) == sorted(kept) and all(index[k][2] for k in kept)
    assert summary["num_samples"] == store.attrs["num_samples"] == len(store.valid_slots()) == 6

    def stored(name):
        return store.read([index[name][0]]).moments[0, 0]

    vae = encoders[0]
    half = lambda a: np.asarray(Image.fromarray(a).resize((RES, RES), Image.BILINEAR))  # noqa: E731
    assert_fp16_close(stored("grey.png"), encode_pixels(vae, half(np.repeat(grey[..., None], 3, -1))))
    grey16_as_8 = np.round(grey16 / 257).astype(np.uint8)
    assert_fp16_close(stored("grey16.png"), encode_pixels(vae, half(np.repeat(grey16_as_8[..., None], 3, -1))))
    cmyk_rgb = np.asarray(Image.open(data / "cmyk.jpg").convert("RGB"))
    assert_fp16_close(stored("cmyk.jpg"), encode_pixels(vae, half(cmyk_rgb)))
    # Centre crop as torchvision: round((59 - 32) / 2) = 14, not 13.
    assert tuple(store["crop"][index["wide.png"][0], 0]) == (0, 14)
    assert_fp16_close(stored("wide.png"), encode_pixels(vae, np.asarray(noise_image(0, 59, 32))[:, 14:46]))
    # 48x32 at resolution 32: no resize, a centre crop of columns 8..39 (red up to 23, then transparent -> white).
    assert tuple(store["crop"][index["rgba.png"][0], 0]) == (0, 8)
    expected_rgba = np.full((RES, RES, 3), 255, np.uint8)
    expected_rgba[:, :16] = (200, 30, 30)
    assert_fp16_close(stored("rgba.png"), encode_pixels(vae, expected_rgba))


def altered_model(tiny_model, dest: Path) -> Path:
    shutil.copytree(tiny_model, dest)
    vae_config = json.loads((dest / "vae" / "config.json").read_text())
    vae_config["scaling_factor"] *= 1.5
    (dest / "vae" / "config.json").write_text(json.dumps(vae_config))
    return dest


def snapshot(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_incompatible_store_is_refused_until_overwrite(tiny_model, tmp_path):
    data = write_imagefolder(tmp_path / "data", [(f"{i}.png", shape_image(i), {"text": f"c {i}"}) for i in range(3)])
    out = tmp_path / "store"
    run(config(tiny_model, out, data, center_crop=True))
    before = snapshot(out)
    other = altered_model(tiny_model, tmp_path / "other-model")
    refusals = [
        (config(other, out, data, center_crop=True), r"model_fingerprint '[0-9a-f]{64}' -> '[0-9a-f]{64}'"),
        (config(tiny_model, out, data, center_crop=True, resolution=40), r"resolution 32 -> 40"),
        (config(tiny_model, out, data), r"center_crop True -> False"),
    ]
    for cfg, what in refusals:
        with pytest.raises(StoreError, match=f"{what}.*pass --overwrite to rebuild"):
            run(cfg)
        assert snapshot(out) == before

    summary = run(config(other, out, data, center_crop=True, overwrite=True))
    assert summary["encoded"] == 3
    attrs = LatentStore.open(out).attrs
    assert attrs["model_fingerprint"] == models.fingerprint(other) != models.fingerprint(tiny_model)
    assert attrs["vae_scaling_factor"] == json.loads((other / "vae" / "config.json").read_text())["scaling_factor"]
    assert run(config(tiny_model, out, data, center_crop=True, resolution=40, overwrite=True))["encoded"] == 3
    assert LatentStore.open(out).attrs["resolution"] == 40

    (tmp_path / "not-a-store").mkdir()
    (tmp_path / "not-a-store" / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="exists and is not a latent store"):
        run(config(tiny_model, tmp_path / "not-a-store", data, overwrite=True))
    assert (tmp_path / "not-a-store" / "keep.txt").read_text() == "mine"


def test_saved_hf_dataset_gives_same_latents_as_imagefolder(tiny_model, tmp_path):
    import datasets

    data = make_demo_data(tmp_path / "data", num_images=6)
    datasets.load_dataset("imagefolder", data_dir=str(data)).save_to_disk(str(tmp_path / "hf"))
    run(config(tiny_model, tmp_path / "from-folder", data, center_crop=True))
    run(config(tiny_model, tmp_path / "from-hf", dataset_name=str(tmp_path / "hf"), center_crop=True))
    a, b = by_id(tmp_path / "from-folder"), by_id(tmp_path / "from-hf")
    assert sorted(a) == sorted(b) and len(a) == 6
    for sid in a:
        np.testing.assert_allclose(a[sid][0].astype(np.float32), b[sid][0].astype(np.float32), atol=1e-3)
        np.testing.assert_allclose(a[sid][1].astype(np.float32), b[sid][1].astype(np.float32), atol=1e-3)
        assert a[sid][4] == b[sid][4]


def test_hf_dataset_with_repeated_file_names_keeps_both(tiny_model, tmp_path):
    import datasets

    rows = [("a/x.png", shape_image(0), {"text": "a red circle"}), ("b/x.png", shape_image(1), {"text": "a square"})]
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir()
    data = write_imagefolder(tmp_path / "data", rows)
    datasets.load_dataset("imagefolder", data_dir=str(data)).save_to_disk(str(tmp_path / "hf"))
    summary = run(config(tiny_model, tmp_path / "store", dataset_name=str(tmp_path / "hf"), center_crop=True))
    assert summary["encoded"] == 2 and summary["skipped"] == []
    assert sorted(by_id(tmp_path / "store")) == ["x.png", "x.png#2"]


def test_cli_run_inspect_and_bad_flags(tiny_model, tmp_path):
    data = make_demo_data(tmp_path / "data", num_images=3)
    out = tmp_path / "store"
    runner = CliRunner()
    result = runner.invoke(cli, ["--pretrained_model_name_or_path", str(tiny_model), "--train_data_dir", str(data),
                                 "--output_dir", str(out), "--resolution", str(RES), "--center_crop"])
    assert result.exit_code == 0, result.output
    assert "3 encoded" in result.stdout
    inspected = runner.invoke(cli, ["--inspect", str(out)])
    assert inspected.exit_code == 0, inspected.output
    factor = json.loads((tiny_model / "vae" / "config.json").read_text())["scaling_factor"]
    assert "samples: 3 complete of 3 slots" in inspected.stdout
    assert f"vae_scaling_factor: {factor}" in inspected.stdout

    no_data = runner.invoke(cli, ["--pretrained_model_name_or_path", str(tiny_model),
                                  "--output_dir", str(tmp_path / "never")])
    assert no_data.exit_code != 0
    assert no_data.stderr == "error: give exactly one of --train_data_dir or --dataset_name\n"
    assert not (tmp_path / "never").exists()
    no_such = runner.invoke(cli, ["--pretrained_model_name_or_path", str(tiny_model), "--output_dir",
                                  str(tmp_path / "never"), "--dataset_name", str(tmp_path / "no-such-dataset")])
    assert no_such.exit_code != 0 and no_such.stderr.count("\n") == 1
    assert no_such.stderr.startswith(f"error: --dataset_name {tmp_path / 'no-such-dataset'}: cannot load it")
    assert not (tmp_path / "never").exists()
    not_store = runner.invoke(cli, ["--inspect", str(tmp_path)])
    assert not_store.exit_code != 0 and not_store.stderr.count("\n") == 1
    assert not_store.stderr.startswith(f"error: --inspect: {tmp_path} is not a t2i latent store")


class PoisonBlackImages:
    """The real VAE, except that all-black inputs come out as `value` (NaN, or too big for fp16)."""

    def __init__(self, vae, value):
        self.vae, self.value = vae, value
        self.config, self.dtype = vae.config, vae.dtype

    def encode(self, x):
        import mindspore as ms

        moments = self.vae.encode(x)[0].asnumpy()
        black = (x.asnumpy() == -1).reshape(len(moments), -1).all(1)
        moments[black, 0, 0, 0] = self.value
        return (ms.Tensor(moments),)


@pytest.mark.parametrize("value", [np.nan, 1e6])
def test_non_finite_latents_are_skipped(tiny_model, tmp_path, monkeypatch, value):
    real = models.load_vae
    monkeypatch.setattr(models, "load_vae", lambda *a, **k: PoisonBlackImages(real(*a, **k), value))
    rows = [("a.png", shape_image(0), {"text": "a"}), ("black.png", Image.new("RGB", (64, 64)), {"text": "b"}),
            ("c.png", shape_image(2), {"text": "c"})]
    data = write_imagefolder(tmp_path / "data", rows)
    summary = run(config(tiny_model, tmp_path / "store", data, center_crop=True))
    assert summary["encoded"] == 2
    assert [s["id"] for s in summary["skipped"]] == ["black.png"]
    assert "non-finite" in summary["skipped"][0]["reason"]
    contents = by_id(tmp_path / "store")
    assert sorted(contents) == ["a.png", "c.png"]
    assert all(np.isfinite(m.astype(np.float32)).all() for m, *_ in contents.values())


def test_empty_prompt_is_the_pipelines_unconditional_embedding_and_old_stores_get_it(main_store, tiny_model,
                                                                                     tmp_path):
    """Caption dropout trains on the store's empty-prompt text states: they must be what the pipeline feeds the UNet as
    the unconditional half of classifier-free guidance. A store made before t2i kept them gets them on a re-run with
    the same flags, and nothing is re-encoded."""
    from t2i.interop.pipeline import assemble, load_parts, load_scheduler

    data, root, _ = main_store
    store = LatentStore.open(root)
    pipe = assemble(models.load_unet(tiny_model), load_scheduler(tiny_model), **load_parts(tiny_model))
    _, unconditional = pipe.encode_prompt("a red circle", 1, True)
    expected = unconditional.asnumpy()[0]
    np.testing.assert_allclose(store.empty_prompt(), expected, rtol=2**-10, atol=1e-6)  # the store is fp16

    old = tmp_path / "old"
    shutil.copytree(root, old)
    group = zarr.open_group(str(old), mode="r+")
    del group.attrs["empty_prompt_done"]
    assert LatentStore.open(old).empty_prompt() is None
    summary = run(config(tiny_model, old, data, random_flip=True, chunk_rows=2))
    assert summary["encoded"] == 0
    np.testing.assert_array_equal(LatentStore.open(old).empty_prompt(), store.empty_prompt())
