"""t2i-train --lora_rank: only the adapter trains, checkpoints hold it and resume exactly, the output is diffusers'
pytorch_lora_weights.safetensors (PyTorch diffusers loads it, tests/peer_lora.py in .venv-peer), and t2i-infer --lora
applies one or several adapters with their scales."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from t2i import infer, train
from t2i.interop import lora, models, pipeline
from t2i.train import TrainConfig, run

PEER = Path(__file__).resolve().parent.parent / ".venv-peer"
PEER_SCRIPT = Path(__file__).with_name("peer_lora.py")
RANK, ALPHA = 4, 12.0  # alpha != rank (and != peft's default 8): the scale 3 must travel in the file's metadata


def config(model, store, out, **kw):
    base = dict(pretrained_model_name_or_path=str(model), latent_store=str(store), output_dir=str(out),
                train_batch_size=4, max_train_steps=4, checkpointing_steps=2, report_to="none", learning_rate=1e-2,
                lora_rank=RANK, lora_alpha=ALPHA, use_ema=True, ema_decay=0.5, jit=False)
    return TrainConfig(**{**base, **kw})


def keep_states(mp) -> list:
    """Within the MonkeyPatch context `mp`, the TrainState of every run train.run sets up is appended to the returned
    list."""
    states = []
    real_setup = train.setup

    def setup(cfg):
        r = real_setup(cfg)
        states.append(r.state)
        return r

    mp.setattr(train, "setup", setup)
    return states


@pytest.fixture(scope="module")
def lora_run(tiny_model, tiny_store, tmp_path_factory):
    """One 4-step LoRA run (EMA, checkpoints at 2 and 4, validation image at 4); its TrainState is kept."""
    home = tmp_path_factory.mktemp("t2i-home")
    out = tmp_path_factory.mktemp("lora") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("T2I_HOME", str(home))
        states = keep_states(mp)
        result = run(config(tiny_model, tiny_store, out, validation_steps=4, validation_prompts=("a red circle",),
                            validation_inference_steps=2))
    return {"out": out, "state": states[0], "result": result, "home": home}


def unet_inputs():
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
            "timestep": np.array([10, 500], dtype=np.int64),
            "encoder_hidden_states": rng.standard_normal((2, 8, 32)).astype(np.float32)}


def unet_output(unet, inputs):
    import mindspore as ms

    return unet(ms.Tensor(inputs["sample"]), ms.Tensor(inputs["timestep"]), ms.Tensor(inputs["encoder_hidden_states"]),
                return_dict=False)[0].asnumpy()


def base_pipe_with(tiny_model, loras):
    pipe = infer.load_pipeline(tiny_model, infer.InferConfig(prompt=("x",), model=str(tiny_model)))
    lora.apply(pipe.unet, loras, pipe.text_encoder)
    return pipe


def test_only_the_adapter_trains_and_the_output_is_the_adapter(lora_run, tiny_model):
    state, out = lora_run["state"], lora_run["out"]
    base = load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))
    adapter = {}
    for name, p in state.unet.parameters_and_names():
        if ".lora_" in name:
            adapter[name] = p.asnumpy()
        else:
            np.testing.assert_array_equal(p.asnumpy(), base[name.replace(".base_layer.", ".")], err_msg=name)
    assert len(state.param_names) == len(adapter) == 64 and set(state.param_names) == set(adapter)
    assert len(state.optimizer.parameters) == 64 and all(".lora_" in p.name for p in state.optimizer.parameters)
    assert all(np.abs(v).max() > 0 for n, v in adapter.items() if "lora_B" in n)  # B starts at zero: it moved
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["README.md", lora.WEIGHT_NAME, train.CONFIG_NAME]
    saved = load_file(str(out / lora.WEIGHT_NAME))
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in saved
    assert {v.dtype for v in saved.values()} == {np.dtype(np.float32)}
    # The output holds the EMA adapter; checkpoint-4 the weights trained.
    ema = load_file(str(out / "checkpoint-4" / "ema.safetensors"))
    for name in state.param_names:
        key = "unet." + name.replace(".default.", ".")
        np.testing.assert_array_equal(saved[key], ema[name])
    assert (out / "validation" / "step-000004.png").is_file()
    card = (out / "README.md").read_text()
    assert "LoRA adapter (rank 4, alpha 12" in card and str(tiny_model) in card and "load_lora_weights" in card
    assert not list(out.glob("checkpoint-*/unet"))  # checkpoints hold the adapter, not the frozen base


def test_resume_equals_an_uninterrupted_run(lora_run, tiny_model, tiny_store, tmp_path, t2i_home):
    out = lora_run["out"]
    split = tmp_path / "split"
    run(config(tiny_model, tiny_store, split, max_train_steps=2))
    resumed = run(config(tiny_model, tiny_store, split, resume_from_checkpoint="latest"))
    assert resumed["start_step"] == 2 and [h["step"] for h in resumed["history"]] == [3, 4]
    for name in (lora.WEIGHT_NAME, "checkpoint-4/" + lora.WEIGHT_NAME, "checkpoint-4/ema.safetensors",
                 "checkpoint-4/optimizer.safetensors"):
        want, got = load_file(str(out / name)), load_file(str(split / name))
        assert set(got) == set(want), name
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6, err_msg=f"{name} {key}")
    np.testing.assert_allclose([h["loss"] for h in resumed["history"]],
                               [h["loss"] for h in lora_run["result"]["history"][2:]], rtol=1e-6)
    with pytest.raises(ValueError, match="lora_rank"):
        run(config(tiny_model, tiny_store, split, lora_rank=8, lora_alpha=12.0, max_train_steps=6,
                   resume_from_checkpoint="latest"))


def test_compiled_step_trains_the_adapter_as_pynative(lora_run, tiny_model, tiny_store, tmp_path, t2i_home):
    """--jit (the default) trains the adapter to the weights --no_jit does (the module run's checkpoint-2); fp16 keeps
    the frozen base in fp16 and the adapter and its optimizer state in fp32."""
    jit = tmp_path / "jit"
    run(config(tiny_model, tiny_store, jit, max_train_steps=2, jit=True))
    got = load_file(str(jit / "checkpoint-2" / lora.WEIGHT_NAME))
    want = load_file(str(lora_run["out"] / "checkpoint-2" / lora.WEIGHT_NAME))
    moved = max(np.abs(v).max() for k, v in want.items() if "lora_B" in k)
    assert moved > 1e-3 and set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=moved * 1e-3, err_msg=key)

    with pytest.MonkeyPatch.context() as mp:
        states = keep_states(mp)
        half = run(config(tiny_model, tiny_store, tmp_path / "fp16", max_train_steps=1, checkpointing_steps=1,
                          mixed_precision="fp16"))
    dtypes = {(".lora_" in n, str(p.dtype)) for n, p in states[0].unet.parameters_and_names()}
    assert dtypes == {(False, "Float16"), (True, "Float32")}
    ckpt = tmp_path / "fp16" / "checkpoint-1"
    moments = {k: v for k, v in load_file(str(ckpt / "optimizer.safetensors")).items() if k.startswith("adam_")}
    assert len(moments) == 128 and {v.dtype for v in moments.values()} == {np.dtype(np.float32)}
    assert {v.dtype for v in load_file(str(ckpt / lora.WEIGHT_NAME)).values()} == {np.dtype(np.float32)}
    np.testing.assert_allclose(half["history"][0]["loss"], lora_run["result"]["history"][0]["loss"], rtol=1e-3)


def run_peer(tiny_model, folder, inputs, tmp_path, kohya=None):
    """tests/peer_lora.py in .venv-peer: (its JSON report, PyTorch's UNet output with the diffusers file[, with the
    kohya file])."""
    if not (PEER / ".installed").is_file():
        pytest.fail(f"{PEER} is missing: run `make test`, which builds it (PyTorch diffusers + peft)", pytrace=False)
    np.savez(tmp_path / "inputs.npz", **inputs)
    args = [str(PEER / "bin" / "python"), str(PEER_SCRIPT), str(tiny_model), str(folder), str(tmp_path / "inputs.npz"),
            str(tmp_path / "torch.npy")] + ([str(kohya)] if kohya else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]
    outputs = [np.load(tmp_path / "torch.npy")] + ([np.load(tmp_path / "torch-kohya.npy")] if kohya else [])
    return json.loads(done.stdout.strip().splitlines()[-1]), outputs


def test_pytorch_diffusers_loads_the_adapter_and_computes_the_same_unet(lora_run, tiny_model, tmp_path):
    """diffusers' pipe.load_lora_weights(out) on the base: the file's keys are exactly those PyTorch's peft-injected
    UNet has for the file's LoraConfig, every one loads with the file's value, at scale alpha/rank, and the UNet's
    output matches t2i's (mindone's load_lora_weights) within 1e-4 while the adapter moves it by far more."""
    out = lora_run["out"]
    inputs = unet_inputs()
    peer, (torch_out,) = run_peer(tiny_model, out, inputs, tmp_path)
    assert peer["stored"] == peer["expected"] and len(peer["expected"]) == 64
    assert peer["differ"] == [] and peer["scales"] == [ALPHA / RANK]
    ours = unet_output(base_pipe_with(tiny_model, [(out, 1.0)]).unet, inputs)
    base = unet_output(models.load_unet(tiny_model), inputs)
    assert np.abs(ours - base).max() > 1e-2
    np.testing.assert_allclose(ours, torch_out, rtol=0, atol=1e-4)


def merged_unet(tiny_model, loras):
    """The base UNet with W += scale * alpha/r * B @ A of every adapter file, merged in NumPy."""
    import mindspore as ms

    unet = models.load_unet(tiny_model)
    params = dict(unet.parameters_and_names())
    for path, scale in loras:
        file = lora.weight_file(path)
        state = load_file(str(file))
        with safe_open(str(file), "np") as f:
            meta = json.loads(f.metadata()["lora_adapter_metadata"])
        factor = scale * meta["unet.lora_alpha"] / meta["unet.r"]
        for key in state:
            if key.endswith(".lora_A.weight"):
                layer = key.removeprefix("unet.").removesuffix(".lora_A.weight")
                delta = state[key.replace("lora_A", "lora_B")] @ state[key]
                w = params[layer + ".weight"]
                w.set_data(ms.Tensor(w.asnumpy() + factor * delta))
    return unet


def test_infer_lora_scales_several_adapters_and_the_last_run_default(lora_run, tiny_model, tmp_path, monkeypatch):
    out = lora_run["out"]
    second = out / "checkpoint-2"
    inputs = unet_inputs()
    both = [(out, 1.0), (second, -0.5)]
    ours = unet_output(base_pipe_with(tiny_model, both).unet, inputs)
    np.testing.assert_allclose(ours, unet_output(merged_unet(tiny_model, both), inputs), rtol=0, atol=1e-4)
    one = unet_output(merged_unet(tiny_model, both[:1]), inputs)
    assert np.abs(ours - one).max() > 1e-3  # the second adapter counts

    monkeypatch.setenv("T2I_HOME", str(lora_run["home"]))
    assert pipeline.read_last_model() == (tiny_model.resolve(), out.resolve())
    common = ["--prompt", "a red circle", "--num_inference_steps", "2", "--output_type", "latent"]
    runner = CliRunner()

    def latents(name, *args):
        result = runner.invoke(infer.cli, common + ["--output", str(tmp_path / f"{name}.npy"), *args])
        assert result.exit_code == 0, result.output
        return np.load(tmp_path / f"{name}.npy")

    default = latents("default")  # the last run: base + adapter at scale 1
    np.testing.assert_array_equal(default, latents("explicit", "--model", str(tiny_model), "--lora", f"{out}:1"))
    base = latents("base", "--model", str(tiny_model))
    assert np.abs(default - base).max() > 1e-3
    np.testing.assert_array_equal(latents("zero", "--model", str(tiny_model), "--lora", f"{out}:0"), base)


def test_a_lora_of_another_geometry_is_refused(lora_run, tiny_model, tmp_path):
    state = load_file(str(lora_run["out"] / lora.WEIGHT_NAME))
    key = next(k for k in state if k.endswith("attn2.to_k.lora_A.weight"))
    bad = tmp_path / "other.safetensors"
    save_file({**state, key: np.zeros((RANK, 48), np.float32)}, str(bad))
    unknown = tmp_path / "unknown.safetensors"
    save_file({"unet.mid_block.nope.lora_A.weight": state[key]}, str(unknown))
    for path, words in ((bad, "another base geometry"), (unknown, "names no layer")):
        result = CliRunner().invoke(infer.cli, ["--model", str(tiny_model), "--prompt", "x", "--lora", f"{path}:0.7",
                                                "--output", str(tmp_path / "x.png")])
        assert result.exit_code == 2, result.output
        message = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(message) == 1
        message = message[0]
        assert str(path) in message and "--lora" in message and words in message
        assert not (tmp_path / "x.png").exists()
    result = CliRunner().invoke(infer.cli, ["--prompt", "x", "--model", str(lora_run["out"])])
    assert result.exit_code == 2 and "--lora" in result.output


def test_lora_dropout_trains_on_cpu(tiny_model, tiny_store, tmp_path, t2i_home):
    """--lora_dropout uses mint.nn.Dropout, which has no CPU kernel: cpu_ops' substitute zeroes a fraction p in
    training, scales the rest by 1/(1-p), and is the identity in eval mode."""
    import mindspore as ms
    from mindspore import mint

    layer = mint.nn.Dropout(p=0.25)
    ones = ms.Tensor(np.ones((20000,), np.float32))
    layer.set_train(True)
    out = layer(ones).asnumpy()
    assert abs((out == 0).mean() - 0.25) < 0.02 and set(np.unique(out)) == {0.0, np.float32(1 / 0.75)}
    layer.set_train(False)
    np.testing.assert_array_equal(layer(ones).asnumpy(), ones.asnumpy())
    result = run(config(tiny_model, tiny_store, tmp_path / "o", max_train_steps=1, checkpointing_steps=1,
                        lora_dropout=0.1, use_ema=False))
    assert np.isfinite(result["history"][0]["loss"])
    assert max(np.abs(v).max() for k, v in load_file(str(tmp_path / "o" / lora.WEIGHT_NAME)).items()
               if "lora_B" in k) > 0
