import pytest

from t2i.core import runtime

runtime.setup("CPU")

# Longest first (measured, --durations): with two xdist workers a long test started last would run alone at the end.
LONGEST_FIRST = ("test_learning.py", "test_readme.py", "test_distributed.py", "test_train.py", "test_checkpointing.py",
                 "test_sdxl.py", "test_lora.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from t2i.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory):
    """The tiny model's SDXL counterpart (t2i.demo.tiny.build_tiny_sdxl_model), its VAE random as tiny_model's."""
    from t2i.demo.tiny import build_tiny_sdxl_model

    return build_tiny_sdxl_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from t2i.demo.shapes import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("data") / "demo", num_images=24)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_model, demo_data):
    """The demo data encoded at 32 px (16x16 latents) with flips: small enough for many train steps in tests."""
    from t2i.precompute import PrecomputeConfig, run

    path = tmp_path_factory.mktemp("stores") / "latents.zarr"
    run(PrecomputeConfig(pretrained_model_name_or_path=str(tiny_model), train_data_dir=str(demo_data),
                         output_dir=str(path), resolution=32, center_crop=True, random_flip=True))
    return path


# 32 px in steps of 8 up to 2:1: the three buckets the demo's ratios 0.5, 1 and 2 fall into (24x48 -> 24x40, 48x24 ->
# 40x24).
BUCKETS = dict(resolution=32, bucket_step=8, max_aspect_ratio=2.0, aspect_buckets=True)


def write_subset(data, rows, dest):
    """An imagefolder of the given metadata rows of the imagefolder `data` (copies: a symlink out of the folder is
    refused as a file outside it)."""
    import json
    import shutil

    dest.mkdir()
    for r in rows:
        shutil.copy(data / r["file_name"], dest / r["file_name"])
    (dest / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest


@pytest.fixture(scope="session")
def mixed_data(tmp_path_factory):
    """36 demo images, one round of the 12 classes at each width/height ratio 1, 2 and 0.5."""
    from t2i.demo.shapes import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("mixed") / "data", num_images=36, size=32,
                          aspect_ratios=(1.0, 2.0, 0.5))


@pytest.fixture(scope="session")
def bucket_store(tmp_path_factory, tiny_model, mixed_data):
    """mixed_data encoded with aspect buckets (BUCKETS) and flips: 12 samples in each of 24x40, 32x32 and 40x24."""
    from t2i.precompute import PrecomputeConfig, run

    path = tmp_path_factory.mktemp("bucket-store") / "latents.zarr"
    run(PrecomputeConfig(pretrained_model_name_or_path=str(tiny_model), train_data_dir=str(mixed_data),
                         output_dir=str(path), center_crop=True, random_flip=True, **BUCKETS))
    return path


@pytest.fixture
def t2i_home(tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_HOME", str(tmp_path / "t2i-home"))
    return tmp_path / "t2i-home"


# The seed command's ids, which tests/test_hub_ids.py and the README's SD-1.5 example resolve through an HF cache.
MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DATASET_ID = "lambdalabs/naruto-blip-captions"


def cache_repo(hub_cache, repo_id, folder, commit, repo_type="model"):
    """`folder` as huggingface_hub leaves a download of repo_id at `commit`: content-addressed blobs, the snapshot's
    files relative symlinks to them, refs/main naming the commit. Returns the snapshot folder."""
    import hashlib
    import os

    repo = hub_cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def cache_dataset(hf_home, repo_id, data_dir, commit):
    """The imagefolder `data_dir` as an online `load_dataset(repo_id)` leaves it: the repo's parquet file in the hub
    cache, and the prepared Arrow data set `datasets` reads offline (<HF_HOME>/datasets/org___name/default/0.0.0/
    <commit>), written by `datasets`' own parquet builder."""
    import json

    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    rows = [json.loads(line) for line in (data_dir / "metadata.jsonl").read_text().splitlines()]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": (data_dir / r["file_name"]).read_bytes(), "path": r["file_name"]} for r in rows],
         "text": [r["text"] for r in rows]}, features=features)
    repo_files = hf_home / "repo-files"
    ds.to_parquet(str(repo_files / "data" / "train-00000-of-00001.parquet"))
    snapshot = cache_repo(hf_home / "hub", repo_id, repo_files, commit, repo_type="dataset")
    namespace, name = repo_id.split("/")
    builder = Parquet(cache_dir=str(hf_home / "datasets"), dataset_name=name, config_name="default",
                      config_id="default", hash=commit,
                      data_files={"train": [str(snapshot / "data" / "train-00000-of-00001.parquet")]})
    builder.download_and_prepare(output_dir=str(hf_home / "datasets" / f"{namespace}___{name}" / "default" / "0.0.0"
                                                / commit))


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory, tiny_model, demo_data):
    """An HF_HOME whose caches hold the tiny model as MODEL_ID and the demo data as DATASET_ID."""
    home = tmp_path_factory.mktemp("hf-home")
    cache_repo(home / "hub", MODEL_ID, tiny_model, "a" * 40)
    cache_dataset(home, DATASET_ID, demo_data, "b" * 40)
    return home


def offline_env(hf_home, **extra):
    """The environment of a command run offline on `hf_home`'s caches (as `HF_HUB_OFFLINE=1` on a user's machine)."""
    import os
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE")}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "MS_DEVICE_TARGET": "CPU", **extra}


def random_adapter(model, dest, rank, alpha, targets):
    """A t2i LoRA output folder made in code on the base `model`: adapters of `rank`/`alpha` on `targets` with random
    non-zero B weights (a fresh adapter's B is zero), saved as training saves them, with the training config that
    names its base."""
    import json

    import mindspore as ms
    import numpy as np

    from t2i.interop import lora, models
    from t2i.interop.pipeline import CONFIG_NAME

    unet = models.load_unet(model)
    config = lora.add_adapters(unet, rank, alpha, targets, 0.0)
    rng = np.random.default_rng(0)
    for name, p in unet.parameters_and_names():
        if ".lora_B." in name:
            p.set_data(ms.Tensor(0.1 * rng.standard_normal(p.shape).astype(np.float32)))
    lora.save_adapter(unet, config, dest)
    (dest / CONFIG_NAME).write_text(json.dumps({"pretrained_model_name_or_path": str(model)}))
    return dest
