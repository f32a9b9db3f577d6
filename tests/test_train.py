import dataclasses
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from t2i import train
from t2i.train import TrainConfig, run
from t2i.training import rows, step
from t2i.training.runlog import read_log


def config(model, store, out, **kw):
    # PyNative unless a test is about the compiled step (--jit, the default): each compile costs ~12 s.
    base = dict(pretrained_model_name_or_path=str(model), latent_store=str(store), output_dir=str(out),
                train_batch_size=4, max_train_steps=4, checkpointing_steps=2, report_to="none",
                num_validation_samples=4, lr_scheduler="constant", learning_rate=1e-3, jit=False)
    return TrainConfig(**{**base, **kw})


def unet_weights(path):
    return load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))


def assert_same_weights(a, b, atol):
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=atol, rtol=0, err_msg=name)


def test_exact_resume(tiny_model, tiny_store, tmp_path, t2i_home):
    """4 steps straight == 2 steps, stop, resume from latest to 4: same UNet, EMA and loss log (litgpt's test_full)."""
    kw = dict(use_ema=True, snr_gamma=5.0, jit=True)
    run(config(tiny_model, tiny_store, tmp_path / "full", **kw))
    first = run(config(tiny_model, tiny_store, tmp_path / "split", max_train_steps=2, **kw))
    assert [h["step"] for h in first["history"]] == [1, 2]
    second = run(config(tiny_model, tiny_store, tmp_path / "split", resume_from_checkpoint="latest", **kw))
    assert second["start_step"] == 2
    assert [h["step"] for h in second["history"]] == [3, 4]  # exactly the two missing steps
    assert_same_weights(unet_weights(tmp_path / "full"), unet_weights(tmp_path / "split"), atol=1e-6)
    for name in ("checkpoint-4",):
        assert_same_weights(load_file(str(tmp_path / "full" / name / "ema.safetensors")),
                            load_file(str(tmp_path / "split" / name / "ema.safetensors")), atol=1e-6)
        assert_same_weights(load_file(str(tmp_path / "full" / name / "optimizer.safetensors")),
                            load_file(str(tmp_path / "split" / name / "optimizer.safetensors")), atol=1e-6)
    log = lambda d: read_log(d / "logs")
    full_log, split_log = log(tmp_path / "full"), log(tmp_path / "split")
    assert [r["step"] for r in split_log] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in split_log], [r["loss"] for r in full_log], rtol=1e-6)
    state = json.loads((tmp_path / "split" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["samples_seen"] == 16 and state["epoch"] == 0


def test_resume_errors(tiny_model, tiny_store, tmp_path, t2i_home, monkeypatch):
    with pytest.raises(ValueError, match="not a t2i checkpoint"):
        run(config(tiny_model, tiny_store, tmp_path / "o", resume_from_checkpoint=str(tmp_path / "nope")))
    run(config(tiny_model, tiny_store, tmp_path / "o", max_train_steps=2))
    # Changed settings are refused before anything loads (a mismatched SD-1.5 resume fails in seconds).
    with monkeypatch.context() as m:
        m.setattr(train, "setup", lambda cfg: pytest.fail("setup ran before the resume check"))
        with pytest.raises(ValueError, match="train_batch_size"):
            run(config(tiny_model, tiny_store, tmp_path / "o", train_batch_size=2, resume_from_checkpoint="latest"))
    # The same store by a relative path resumes.
    monkeypatch.chdir(tiny_store.parent)
    resumed = run(config(tiny_model, f"./{tiny_store.name}", tmp_path / "o", max_train_steps=3,
                         resume_from_checkpoint="latest"))
    assert resumed["start_step"] == 2


def test_checkpoint_contents_and_pruning(tiny_model, tiny_store, tmp_path, t2i_home):
    out = tmp_path / "o"
    run(config(tiny_model, tiny_store, out, max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=2,
               mixed_precision="fp16"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert not list(out.glob(".checkpoint-*"))  # no temp folders left behind
    ckpt = out / "checkpoint-6"
    opt = load_file(str(ckpt / "optimizer.safetensors"))
    assert any(k.startswith("adam_m.") for k in opt) and any(k.startswith("adam_v.") for k in opt)
    assert "global_step" in opt and int(opt["global_step"].reshape(-1)[0]) == 6
    scaler = load_file(str(ckpt / "loss_scaler.safetensors"))
    assert set(scaler) == {"scale_value", "counter"}
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["mixed_precision"] == "fp16" and saved["checkpoints_total_limit"] == 2


def test_gradient_accumulation_equals_one_big_batch(tiny_model, tiny_store, tmp_path, t2i_home):
    # adam_epsilon=1 makes Adam's update smooth in the gradient, so summation-order noise stays tiny.
    kw = dict(max_train_steps=2, checkpointing_steps=10, adam_epsilon=1.0, learning_rate=1e-2)
    run(config(tiny_model, tiny_store, tmp_path / "big", train_batch_size=4, gradient_accumulation_steps=1, **kw))
    run(config(tiny_model, tiny_store, tmp_path / "acc", train_batch_size=2, gradient_accumulation_steps=2, **kw))
    base = unet_weights(tiny_model)
    big, acc = unet_weights(tmp_path / "big"), unet_weights(tmp_path / "acc")
    moved = max(np.abs(big[k] - base[k]).max() for k in big)
    assert moved > 1e-4
    assert_same_weights(big, acc, atol=moved * 1e-3)


def test_overflow_skips_step_and_lowers_loss_scale(tiny_model, tiny_store, tmp_path, t2i_home, monkeypatch):
    real = train.make_batch
    calls = {"n": 0}

    def poisoned(*args, **kw):
        batch = real(*args, **kw)
        calls["n"] += 1
        if calls["n"] == 2:  # the second optimizer step gets an infinite loss
            batch.target = batch.target * np.float32(1e38) * 10
        return batch

    monkeypatch.setattr(train, "make_batch", poisoned)
    out = tmp_path / "o"
    result = run(config(tiny_model, tiny_store, out, max_train_steps=3, checkpointing_steps=1, mixed_precision="fp16",
                        jit=True))
    h = result["history"]
    assert [r["skipped_steps"] for r in h] == [0, 1, 1]
    assert h[1]["loss_scale"] == h[0]["loss_scale"] / 2
    assert result["skipped_steps"] == 1
    assert_same_weights(unet_weights(out / "checkpoint-1"), unet_weights(out / "checkpoint-2"), atol=0)
    assert np.isfinite(h[2]["loss"])


def test_compiled_step_equals_pynative(tiny_model, tiny_store, tmp_path, t2i_home):
    """--jit (one graph for forward+backward) and --no_jit train to the same weights and losses."""
    # adam_epsilon=1 keeps Adam's first step smooth in the gradient: with eps=1e-8 it is lr * sign(g), which the
    # compiled and op-by-op kernels' rounding can flip for near-zero gradients.
    kw = dict(max_train_steps=2, checkpointing_steps=10, snr_gamma=5.0, adam_epsilon=1.0, learning_rate=1e-2)
    pynative = run(config(tiny_model, tiny_store, tmp_path / "pynative", jit=False, **kw))
    compiled = run(config(tiny_model, tiny_store, tmp_path / "jit", jit=True, **kw))
    base = unet_weights(tiny_model)
    a, b = unet_weights(tmp_path / "pynative"), unet_weights(tmp_path / "jit")
    moved = max(np.abs(a[k] - base[k]).max() for k in a)
    assert moved > 1e-4
    assert_same_weights(a, b, atol=moved * 1e-3)
    np.testing.assert_allclose([h["loss"] for h in compiled["history"]], [h["loss"] for h in pynative["history"]],
                               rtol=1e-5)


def test_fingerprint_mismatch_is_refused(tiny_model, tiny_store, tmp_path, t2i_home):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    vae_config = other / "vae" / "config.json"
    cfg = json.loads(vae_config.read_text())
    cfg["scaling_factor"] = 1.0
    vae_config.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="different VAE/text encoder"):
        run(config(other, tiny_store, tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_output_is_a_pipeline_with_ema_weights(tiny_model, tiny_store, tmp_path, t2i_home):
    from mindone.diffusers import StableDiffusionPipeline

    out = tmp_path / "o"
    result = run(config(tiny_model, tiny_store, out, max_train_steps=2, use_ema=True, validation_steps=2,
                        validation_prompts=("a red circle", "a blue square"), validation_inference_steps=2,
                        validation_height=24, validation_width=40, report_to="tensorboard"))
    for component in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for f in (tiny_model / component).rglob("*"):
            if f.is_file():
                assert (out / component / f.relative_to(tiny_model / component)).read_bytes() == f.read_bytes()
    ema = load_file(str(out / "checkpoint-2" / "ema.safetensors"))
    assert_same_weights(unet_weights(out), ema, atol=0)
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, generator=np.random.default_rng(0))[0][0]
    assert image.size == (32, 32)
    grid = out / "validation" / "step-000002.png"
    assert grid.is_file()
    from PIL import Image

    assert Image.open(grid).size == (2 * 40, 24)  # two prompts at --validation_width 40, --validation_height 24
    with pytest.raises(ValueError, match="--validation_width must be a positive multiple of 8"):
        config(tiny_model, tiny_store, out, validation_width=36)
    assert list((out / "logs").glob("events.out.tfevents.*"))
    assert result["history"][-1]["val_loss"] is not None
    assert (t2i_home / "last_model").read_text() == str(out.resolve())


def test_v_prediction_is_recorded_in_output_scheduler(tiny_model, tiny_store, tmp_path, t2i_home):
    out = tmp_path / "o"
    run(config(tiny_model, tiny_store, out, max_train_steps=1, prediction_type="v_prediction", snr_gamma=5.0))
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_cli(tiny_model, tiny_store, tmp_path, t2i_home):
    out = tmp_path / "cli"
    args = ["--pretrained_model_name_or_path", str(tiny_model), "--latent_store", str(tiny_store),
            "--output_dir", str(out), "--train_batch_size", "4", "--max_train_steps", "1", "--report_to", "none"]
    result = CliRunner().invoke(train.cli, args)
    assert result.exit_code == 0, result.output
    assert (out / "model_index.json").is_file()
    assert json.loads((out / train.CONFIG_NAME).read_text())["max_train_steps"] == 1
    bad = CliRunner().invoke(train.cli, args[:2] + ["--latent_store", str(tmp_path / "missing.zarr")])
    assert bad.exit_code == 2
    assert "missing.zarr" in bad.output and "t2i-precompute" in bad.output
    big = CliRunner().invoke(train.cli, args + ["--train_batch_size", "64"])
    assert big.exit_code == 2 and "exceeds" in big.output


def test_model_card_hub_upload_and_flash_attention_flag(tiny_model, tiny_store, tmp_path, t2i_home, monkeypatch,
                                                        capsys):
    uploads = []

    def fake_push(folder, repo_id, token=None):
        # The upload comes last: by then the local pipeline and card are complete.
        assert (folder / "model_index.json").is_file() and (folder / "README.md").is_file()
        uploads.append((folder, repo_id, token))
        raise ValueError("cannot reach the Hub (offline)")

    monkeypatch.setattr(train, "push_to_hub", fake_push)
    out = tmp_path / "o"
    with pytest.raises(ValueError, match="offline"):
        run(config(tiny_model, tiny_store, out, max_train_steps=1, push_to_hub=True, hub_model_id="me/tiny",
                   hub_token="hf_secret123", enable_xformers_memory_efficient_attention=True))
    assert uploads == [(out, "me/tiny", "hf_secret123")]
    card = (out / "README.md").read_text()
    assert str(tiny_model) in card and "learning_rate" in card
    assert "hf_secret123" not in card and "hf_secret123" not in (out / train.CONFIG_NAME).read_text()
    assert "not available" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--hub_model_id"):
        config(tiny_model, tiny_store, out, push_to_hub=True)


def test_fused_clip_and_ema_match_mindone():
    """The compiled clip/norm and EMA step give mindspore's clip_by_global_norm and mindone's EMAModel.step."""
    import mindspore as ms
    from mindone.diffusers.training_utils import EMAModel
    from mindspore import nn, ops

    rng = np.random.default_rng(0)
    shapes = [(3, 4), (5,), (2, 3, 3, 3)]
    grads = tuple(ms.Tensor(rng.standard_normal(s).astype(np.float32)) for s in shapes)
    norm = np.sqrt(sum((g.asnumpy() ** 2).sum() for g in grads))
    clip_grad_norm = step._fused().clip_grad_norm
    for max_norm in (norm / 3, norm * 3):  # clipped, and left alone
        got_norm, factor = clip_grad_norm(grads, ms.Tensor(max_norm, ms.float32), ms.Tensor(1.0, ms.float32))
        np.testing.assert_allclose(float(got_norm), norm, rtol=1e-6)
        np.testing.assert_allclose(float(factor), min(1.0, max_norm / norm), rtol=1e-6)
        for g, ref in zip(grads, ops.clip_by_global_norm(grads, float(max_norm))):
            np.testing.assert_allclose(g.asnumpy() * float(factor), ref.asnumpy(), rtol=1e-6, atol=1e-7)
    scaled = tuple(g * 1024.0 for g in grads)  # loss-scaled gradients: the norm is the unscaled one's
    got_norm, factor = clip_grad_norm(scaled, ms.Tensor(norm / 3, ms.float32), ms.Tensor(1024.0, ms.float32))
    np.testing.assert_allclose(float(got_norm), norm, rtol=1e-6)
    for g, s, ref in zip(grads, scaled, ops.clip_by_global_norm(grads, float(norm / 3))):
        np.testing.assert_allclose(s.asnumpy() * float(factor), ref.asnumpy(), rtol=1e-6, atol=1e-7)

    class Net(nn.Cell):
        def __init__(self, seed):
            super().__init__()
            r = np.random.default_rng(seed)
            self.a = ms.Parameter(ms.Tensor(r.standard_normal((4, 3)).astype(np.float32)), name="a")
            self.b = ms.Parameter(ms.Tensor(r.standard_normal((7,)).astype(np.float32)), name="b")

    net, ref_net = Net(1), Net(1)
    fused = step.build_ema(net.trainable_params(), decay=0.9)
    ref = EMAModel(ref_net.trainable_params(), decay=0.9)
    for k in range(3):
        for n in (net, ref_net):
            for p in n.trainable_params():
                ops.assign(p, p + float(k + 1))
        fused.step(net.trainable_params())
        ref.step(ref_net.trainable_params())
        assert fused.cur_decay_value == ref.cur_decay_value
        for s, r in zip(fused.shadow_params, ref.shadow_params):
            np.testing.assert_allclose(s.asnumpy(), r.asnumpy(), rtol=1e-6)
    assert not np.allclose(fused.shadow_params[0].asnumpy(), net.a.asnumpy())  # the shadow lags the weights


def test_validation_images_sample_with_the_trained_prediction_type(tiny_model, tiny_store, tmp_path, t2i_home,
                                                                   monkeypatch):
    """A v_prediction run on an epsilon base renders its validation images with a v_prediction scheduler."""
    from t2i.interop import pipeline

    seen = []
    real = pipeline.assemble

    def spy(unet, scheduler, **parts):
        seen.append(scheduler.config.prediction_type)
        return real(unet, scheduler, **parts)

    monkeypatch.setattr(pipeline, "assemble", spy)
    assert json.loads((tiny_model / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    run(config(tiny_model, tiny_store, tmp_path / "v", max_train_steps=1, prediction_type="v_prediction",
               validation_steps=1, validation_prompts=("a red circle",), validation_inference_steps=2))
    run(config(tiny_model, tiny_store, tmp_path / "eps", max_train_steps=1, validation_steps=1,
               validation_prompts=("a red circle",), validation_inference_steps=2))
    assert seen == ["v_prediction", "epsilon"]


def test_resume_with_more_steps_across_an_epoch_never_trains_on_held_out(tiny_model, tiny_store, tmp_path, t2i_home,
                                                                         monkeypatch):
    """3 steps, then resumed with --max_train_steps 7 (past the epoch end at 5) == 7 steps straight; no batch ever
    holds one of the held-out validation samples."""
    from t2i.data.store import LatentStore

    store = LatentStore.open(tiny_store)
    trained = set(map(int, rows.split_holdout(store.valid_slots(), 4, 0)[0]))
    held_out = [store.read([s]).moments[0] for s in store.valid_slots() if int(s) not in trained]
    batches = []
    real = train.make_batch

    def record(arrays, *args, **kw):
        batches.append(arrays.moments)
        return real(arrays, *args, **kw)

    monkeypatch.setattr(train, "make_batch", record)
    straight = run(config(tiny_model, tiny_store, tmp_path / "straight", max_train_steps=7, checkpointing_steps=10))
    run(config(tiny_model, tiny_store, tmp_path / "split", max_train_steps=3, checkpointing_steps=3))
    resumed = run(config(tiny_model, tiny_store, tmp_path / "split", max_train_steps=7, checkpointing_steps=10,
                         resume_from_checkpoint="latest"))
    assert resumed["start_step"] == 3 and [h["step"] for h in resumed["history"]] == [4, 5, 6, 7]
    assert_same_weights(unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "split"), atol=1e-6)
    np.testing.assert_allclose([h["loss"] for h in resumed["history"]],
                               [h["loss"] for h in straight["history"][3:]], rtol=1e-6)
    assert len(batches) == 14 and len(held_out) == 4
    for moments in batches:
        for sample in moments:
            assert not any(np.array_equal(sample, h) for h in held_out)


def test_lr_schedule_warmup_and_scale_lr(tiny_model, tiny_store, tmp_path, t2i_home):
    """--scale_lr multiplies by batch x accumulation; linear warmup from 0 then decay to 0, as diffusers'
    get_scheduler; the first step's lr of 0 leaves the weights where they were."""
    cfg = config(tiny_model, tiny_store, tmp_path / "o", lr_scheduler="linear", lr_warmup_steps=2, max_train_steps=6,
                 learning_rate=1e-3, scale_lr=True, train_batch_size=2, gradient_accumulation_steps=2)
    tr = train.setup(cfg)
    np.testing.assert_allclose(tr.schedule, 4e-3 * np.array([0, 0.5, 1, 0.75, 0.5, 0.25]), rtol=1e-6)
    plain = train.setup(config(tiny_model, tiny_store, tmp_path / "p", lr_scheduler="cosine", lr_warmup_steps=0,
                               max_train_steps=4, learning_rate=1e-3, train_batch_size=2,
                               gradient_accumulation_steps=2))
    np.testing.assert_allclose(plain.schedule, 1e-3 * (1 + np.cos(np.pi * np.arange(4) / 4)) / 2, rtol=1e-6)
    run(dataclasses.replace(cfg, max_train_steps=2, checkpointing_steps=1))
    assert_same_weights(unet_weights(tmp_path / "o" / "checkpoint-1"), unet_weights(tiny_model), atol=0)
    moved = unet_weights(tmp_path / "o" / "checkpoint-2")
    assert max(np.abs(moved[k] - unet_weights(tiny_model)[k]).max() for k in moved) > 1e-4


def test_ema_validation_leaves_the_training_weights(tiny_model, tiny_store, tmp_path, t2i_home):
    """Validation images are sampled with the EMA weights swapped in; the weights being trained come back unchanged."""
    kw = dict(max_train_steps=2, checkpointing_steps=2, use_ema=True, ema_decay=0.5)
    run(config(tiny_model, tiny_store, tmp_path / "val", validation_steps=1, validation_prompts=("a red circle",),
               validation_inference_steps=2, **kw))
    run(config(tiny_model, tiny_store, tmp_path / "plain", **kw))
    with_val, without = (unet_weights(tmp_path / d / "checkpoint-2") for d in ("val", "plain"))
    assert_same_weights(with_val, without, atol=1e-6)
    ema = load_file(str(tmp_path / "val" / "checkpoint-2" / "ema.safetensors"))
    assert max(np.abs(ema[k] - with_val[k]).max() for k in ema) > 1e-4


def test_caption_dropout_trains_on_the_stores_empty_prompt(tiny_model, tiny_store, tmp_path, t2i_home, monkeypatch):
    """--caption_dropout_probability reaches the step as the store's empty-prompt text states; a store made before
    t2i kept them is refused with the way out, before any model is loaded."""
    import zarr

    from t2i.data.store import LatentStore

    old = tmp_path / "old.zarr"
    shutil.copytree(tiny_store, old)
    del zarr.open_group(str(old), mode="r+").attrs["empty_prompt_done"]
    with pytest.raises(ValueError, match="re-run t2i-precompute with the same flags"):
        run(config(tiny_model, old, tmp_path / "refused", caption_dropout_probability=0.5))
    assert not (tmp_path / "refused").exists()

    states = []
    real = train.make_batch

    def record(*args, **kw):
        batch = real(*args, **kw)
        states.append(batch.cond.states)
        return batch

    monkeypatch.setattr(train, "make_batch", record)
    run(config(tiny_model, tiny_store, tmp_path / "o", max_train_steps=2, caption_dropout_probability=0.5))
    empty = LatentStore.open(tiny_store).empty_prompt().astype(np.float32)
    dropped = [(s == empty).all(axis=(1, 2)) for s in states]
    assert 0 < sum(d.sum() for d in dropped) < 8, dropped  # seed 0's draws drop some of the 8 samples, not all


def test_validation_epochs_validates_at_each_epochs_end(tiny_model, tiny_store, tmp_path, t2i_home):
    """--validation_epochs 1 (the seed's flag): the held-out loss at every epoch's last step and at the run's end. 20
    training samples in batches of 4: 5 steps an epoch."""
    result = run(config(tiny_model, tiny_store, tmp_path / "o", max_train_steps=7, validation_epochs=1))
    assert [h["step"] for h in result["history"] if "val_loss" in h] == [5, 7]
    with pytest.raises(ValueError, match="give one"):
        config(tiny_model, tiny_store, tmp_path / "o", validation_epochs=1, validation_steps=2)
