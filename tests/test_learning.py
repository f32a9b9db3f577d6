"""The chain learns: the demo's precompute -> train -> infer, measured in latent space (see t2i/demo.py)."""

import json

import pytest

from t2i.demo import DemoSettings, main
from t2i.tiny import demo_classes


@pytest.mark.slow
def test_demo_learns_text_to_image(tmp_path, t2i_home, capsys):
    s = DemoSettings(root=tmp_path / "demo")
    main(s)
    assert (s.root / "yoda.png").is_file() and (s.root / "loss.png").is_file()
    assert sorted((s.output / "validation").glob("step-*.png"))
    # The figures as the demo reports them to the user: learning.json.
    report = json.loads((s.root / "learning.json").read_text())
    assert report["classes"] == len(demo_classes()) and report["samples"] == len(s.seeds) * report["classes"]
    # Held-out samples: the right captions predict the noise better than shuffled ones.
    assert report["val_loss"] < report["val_loss_shuffled"]
    # Latents sampled for a class prompt land nearest their own class (and colour) well above chance.
    assert report["accuracy"] > 2 * report["chance"]
    assert report["pooled_colour_accuracy"] > 1.4 * report["colour_chance"]
    out = capsys.readouterr().out
    for stage in ("precompute", "train", "infer"):
        assert stage in out
