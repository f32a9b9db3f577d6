import pytest

from t2i import runtime

runtime.setup("CPU")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from t2i.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from t2i.tiny import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("data") / "demo", num_images=24)
