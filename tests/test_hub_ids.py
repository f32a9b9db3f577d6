"""Hub model ids and data set names, as the seed's command passes them, resolved through the Hugging Face caches: a
temporary HF_HOME holds the tiny model in huggingface_hub's on-disk layout and the demo data as `datasets` caches a
Hub data set (conftest.hf_home), and the real commands run offline on ids alone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATASET_ID, MODEL_ID, offline_env

from t2i.interop import hub, models


def run(argv, hf_home, cwd):
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=offline_env(hf_home, T2I_HOME=str(cwd / "t2i-home")))


# The commands' click entry points (what the console scripts call), one after the other in one process: each command
# as its own process would import MindSpore and mindone again, which is most of a tiny run's time.
COMMANDS = """
import json, sys
from t2i import infer, precompute, train
for name, args in json.loads(sys.argv[1]):
    print(f"=== t2i-{name}", flush=True)
    {"precompute": precompute, "train": train, "infer": infer}[name].cli.main(args, prog_name=f"t2i-{name}",
                                                                             standalone_mode=False)
"""


def test_seed_ids_precompute_train_infer_offline(hf_home, tiny_model, tmp_path):
    """precompute -> train -> infer with the seed's ids only, offline. The store's identity is the one the same model
    gets from its local folder: a precompute by path would update this store, not refuse it."""
    from t2i.precompute import PrecomputeConfig, store_identity

    snapshot = hf_home / "hub" / f"models--{MODEL_ID.replace('/', '--')}" / "snapshots" / ("a" * 40)
    commands = [
        ("precompute", ["--pretrained_model_name_or_path", MODEL_ID, "--dataset_name", DATASET_ID, "--resolution", "32",
                        "--center_crop", "--output_dir", "latents.zarr"]),
        ("train", ["--pretrained_model_name_or_path", MODEL_ID, "--latent_store", "latents.zarr", "--max_train_steps",
                   "1", "--train_batch_size", "4", "--num_validation_samples", "0", "--no_jit", "--report_to", "none",
                   "--output_dir", "out"]),
        ("infer", ["--model", MODEL_ID, "--prompt", "a red circle", "--num_inference_steps", "2", "--height", "32",
                   "--width", "32", "--output", "base.png"]),
    ]
    result = run([sys.executable, "-c", COMMANDS, json.dumps(commands)], hf_home, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("=== t2i-") == 3
    assert result.stdout.count(f"using the cached snapshot {snapshot}") == 3
    assert f"--dataset_name {DATASET_ID}: 24 rows from {hf_home / 'datasets' / 'lambdalabs___naruto-blip-captions'}" \
        in result.stdout
    store = json.loads((tmp_path / "latents.zarr" / "zarr.json").read_text())["attributes"]
    assert store["num_samples"] == 24
    by_path = PrecomputeConfig(pretrained_model_name_or_path=str(tiny_model), train_data_dir="unused",
                               output_dir="unused", resolution=32, center_crop=True)
    assert store_identity(by_path, models.fingerprint(tiny_model)).mismatch(store) == ""
    copied = tmp_path / "out" / "vae" / "diffusion_pytorch_model.safetensors"  # a copy of the snapshot's file, no link
    assert not copied.is_symlink() and copied.read_bytes() == (tiny_model / "vae" / copied.name).read_bytes()
    assert (tmp_path / "out" / "unet").is_dir() and (tmp_path / "base.png").is_file()


def test_missing_id_offline_is_one_line_naming_the_cache(hf_home, tmp_path):
    infer = Path(sys.executable).parent / "t2i-infer"
    result = run([infer, "--model", "nobody/missing-model", "--prompt", "x", "--output", "x.png"], hf_home, tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: --model: nobody/missing-model is not in the Hugging Face cache "
                               f"{hf_home / 'hub' / 'models--nobody--missing-model'}")
    assert "HF_HUB_OFFLINE=1" in lines[0] and not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------------------------------
# In process: the Hub's answers stand in for the network.


class FakeHub:
    """HfApi.model_info and snapshot_download over a repo listing whose files are served from `files` (name ->
    bytes) into the cache layout, recording what each download asked for."""

    def __init__(self, files, cached, sha="c" * 40, error=None):
        self.files, self.cached, self.sha, self.error, self.requested = files, cached, sha, error, []

    def model_info(self, repo_id, revision=None):
        from types import SimpleNamespace

        if self.error is not None:
            raise self.error
        return SimpleNamespace(sha=self.sha, siblings=[SimpleNamespace(rfilename=f) for f in self.files])

    def snapshot_download(self, repo_id, revision=None, cache_dir=None, allow_patterns=None, local_files_only=False):
        if local_files_only:  # the cache only: huggingface_hub's own lookup
            return self.cached(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
        repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / (revision or "main")).write_text(self.sha)
        folder = repo / "snapshots" / self.sha
        for name in allow_patterns:
            self.requested.append(name)
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(self.files[name])
        return str(folder)


@pytest.fixture
def fake_hub(monkeypatch, tiny_model):
    import huggingface_hub

    files = {str(p.relative_to(tiny_model)): p.read_bytes() for p in tiny_model.rglob("*") if p.is_file()}
    for component, name in (("vae", "diffusion_pytorch_model"), ("unet", "diffusion_pytorch_model"),
                            ("text_encoder", "model")):
        files[f"{component}/{name}.fp16.safetensors"] = files[f"{component}/{name}.safetensors"]
        files[f"{component}/{name}.bin"] = b"a torch.save archive nobody should fetch"
    files["v1-5-pruned.ckpt"] = b"the original checkpoint, gigabytes on the Hub"
    fake = FakeHub(files, huggingface_hub.snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, revision=None:
                        fake.model_info(repo_id, revision))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def test_fetches_only_what_the_stage_loads(fake_hub, tmp_path, capsys):
    folder = hub.resolve_model(MODEL_ID, components=models.FINGERPRINT_COMPONENTS, cache_dir=tmp_path)
    weights = {f for f in fake_hub.requested if f.endswith((".safetensors", ".bin", ".ckpt"))}
    assert weights == {"vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}
    assert not any(f.startswith(("unet/", "scheduler/")) for f in fake_hub.requested)
    assert "fetched 9 files" in capsys.readouterr().out
    models.load_vae(folder)  # what was fetched loads through the checked loader

    fake_hub.requested.clear()
    hub.resolve_model(MODEL_ID, components=None, variant="fp16", cache_dir=tmp_path)
    weights = {f for f in fake_hub.requested if f.endswith((".safetensors", ".bin", ".ckpt"))}
    assert weights == {"vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors",
                       "unet/diffusion_pytorch_model.fp16.safetensors"}
    assert "scheduler/scheduler_config.json" in fake_hub.requested
    printed = capsys.readouterr().out
    assert "fetched 5 files" in printed and "unet/diffusion_pytorch_model.fp16.safetensors" in printed


@pytest.mark.parametrize("error, expected", [
    ("GatedRepoError", "--pretrained_model_name_or_path: org/model is a gated model: accept its terms at "
                       "https://huggingface.co/org/model"),
    ("RepositoryNotFoundError", "--pretrained_model_name_or_path: org/model is neither a local folder nor a model on "
                                "the Hub"),
    ("RevisionNotFoundError", "--revision v9: org/model has no such branch, tag or commit"),
])
def test_hub_refusals_are_one_line(fake_hub, tmp_path, error, expected):
    from huggingface_hub import errors

    fake_hub.error = getattr(errors, error)("404 Client Error. (Request ID: x)\n\nmore lines")
    with pytest.raises(ValueError) as e:
        hub.resolve_model("org/model", revision="v9", cache_dir=tmp_path)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)
    assert not fake_hub.requested


def test_offline_cache_without_the_stages_files_is_refused(fake_hub, tmp_path):
    """A snapshot cached by precompute (no UNet) cannot serve infer offline: the refusal says what is missing."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    hub.resolve_model(MODEL_ID, components=models.FINGERPRINT_COMPONENTS, cache_dir=tmp_path)
    fake_hub.error = OfflineModeIsEnabled("offline")
    assert (hub.resolve_model(MODEL_ID, components=models.FINGERPRINT_COMPONENTS, cache_dir=tmp_path)
            / "vae" / "config.json").is_file()
    with pytest.raises(ValueError, match="lacks files this command loads .*no unet/ folder.*HF_HUB_OFFLINE=1"):
        hub.resolve_model(MODEL_ID, "--model", components=("unet", "vae"), cache_dir=tmp_path)


def test_missing_dataset_offline_names_the_datasets_cache(hf_home, monkeypatch):
    import datasets

    from t2i.data.dataset import read_hf_dataset

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cache = hf_home / "datasets"
    samples = read_hf_dataset(DATASET_ID, cache_dir=str(cache))
    assert len(samples) == 24 and samples[0].captions == ["a red circle"]
    with pytest.raises(ValueError, match=f"--dataset_name nobody/missing: not in the datasets cache {cache} and the Hub "
                                         "cannot be reached"):
        read_hf_dataset("nobody/missing", cache_dir=str(cache))
