import pytest

from t2i import runtime

runtime.setup("CPU")

# Longest first (measured, --durations): with two xdist workers a long test started last would run alone at the end.
LONGEST_FIRST = ("test_learning.py", "test_readme.py", "test_distributed.py", "test_train.py", "test_checkpointing.py",
                 "test_lora.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from t2i.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from t2i.tiny import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("data") / "demo", num_images=24)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_model, demo_data):
    """The demo data encoded at 32 px (16x16 latents) with flips: small enough for many train steps in tests."""
    from t2i.precompute import PrecomputeConfig, run

    path = tmp_path_factory.mktemp("stores") / "latents.zarr"
    run(PrecomputeConfig(pretrained_model_name_or_path=str(tiny_model), train_data_dir=str(demo_data),
                         output_dir=str(path), resolution=32, center_crop=True, random_flip=True))
    return path


@pytest.fixture
def t2i_home(tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_HOME", str(tmp_path / "t2i-home"))
    return tmp_path / "t2i-home"
