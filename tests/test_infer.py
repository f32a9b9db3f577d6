import functools
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from t2i import infer
from t2i.infer import InferConfig, run


def cfg(model, out, **kw):
    base = dict(prompt=("a red circle",), model=model and str(model), output=str(out), num_inference_steps=3,
                height=32, width=32)
    return InferConfig(**{**base, **kw})


def test_same_seed_same_image_other_seed_differs(tiny_model, tmp_path, t2i_home):
    a = run(cfg(tiny_model, tmp_path / "a.png", seed=1))[0]
    b = run(cfg(tiny_model, tmp_path / "b.png", seed=1))[0]
    c = run(cfg(tiny_model, tmp_path / "c.png", seed=2))[0]
    pa, pb, pc = (np.asarray(Image.open(p)) for p in (a, b, c))
    assert pa.shape == (32, 32, 3)
    np.testing.assert_array_equal(pa, pb)
    assert np.abs(pa.astype(int) - pc.astype(int)).sum() > 0


def test_prompt_result_does_not_depend_on_other_prompts(tiny_model, tmp_path, t2i_home):
    alone = run(cfg(tiny_model, tmp_path / "alone"))
    together = run(cfg(tiny_model, tmp_path / "together", prompt=("a blue square", "a red circle")))
    assert [p.name for p in together] == ["a_blue_square-s0-0.png", "a_red_circle-s0-0.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(alone[0])), np.asarray(Image.open(together[1])))


def test_compiled_unet_gives_the_same_latents(tiny_model, tmp_path, t2i_home, monkeypatch):
    """--jit sends every denoising step through models.compiled's ms.jit graph and gets the PyNative result."""
    from t2i.interop import models

    calls = []
    real = infer.load_pipeline

    def spy(model, config):
        pipe = real(model, config)
        with models.compiled(pipe.unet):  # creates the graph (compiled on first call); count its calls
            pass
        graph = pipe.unet.__dict__["_t2i_graph"]
        pipe.unet.__dict__["_t2i_graph"] = lambda *args: calls.append(1) or graph(*args)
        return pipe

    monkeypatch.setattr(infer, "load_pipeline", spy)
    kw = dict(output_type="latent", prompt=("a red circle", "a blue square"), scheduler="ddim")
    plain = run(cfg(tiny_model, tmp_path / "plain", **kw))
    assert calls == []
    jitted = run(cfg(tiny_model, tmp_path / "jit", jit=True, **kw))
    assert len(calls) == 2 * 3  # 2 prompts x 3 DDIM steps
    for a, b in zip(plain, jitted):
        np.testing.assert_allclose(np.load(b), np.load(a), rtol=1e-5, atol=1e-5)


# The diffusers class each --scheduler name must give; a name SCHEDULERS gains without an entry here fails below.
SCHEDULER_CLASSES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@pytest.fixture(scope="module")
def compiled_pipeline(tiny_model):
    """One pipeline for every --jit run below, and the list of its UNet graph's calls. Its graph (models.compiled)
    compiles once per timestep dtype (int64: DDPM, DDIM, PNDM, DPM++, UniPC; float32: LMS, Euler, Euler a, Heun)
    instead of once per run, ~7 s each."""
    from t2i.interop import models

    pipe = infer.load_pipeline(tiny_model, cfg(tiny_model, "-"))
    with models.compiled(pipe.unet):  # creates the graph (compiled on first call)
        pass
    graph = pipe.unet.__dict__["_t2i_graph"]
    calls = []
    pipe.unet.__dict__["_t2i_graph"] = lambda *args: calls.append(1) or graph(*args)
    return pipe, calls


@pytest.mark.parametrize("name", list(infer.SCHEDULERS))
def test_every_scheduler_samples_on_cpu(tiny_model, compiled_pipeline, tmp_path, name, t2i_home, monkeypatch):
    """Each scheduler samples 3 steps as the folder's own scheduler (its config's _class_name), as --scheduler on a
    folder that ships another (PNDM), and as --scheduler with --jit: finite, non-constant latents, the same from every
    route, every step taken by that class, and with --jit every UNet call made by the compiled graph."""
    from mindone import diffusers

    cls = SCHEDULER_CLASSES[name]
    own = tmp_path / "model"
    shutil.copytree(tiny_model, own)
    config_file = own / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "_class_name": cls}))

    steps = []
    real_step = getattr(diffusers, cls).step

    @functools.wraps(real_step)  # keeps step's signature, from which the pipeline decides to pass the generator
    def step(self, *args, **kwargs):
        steps.append(type(self).__name__)
        return real_step(self, *args, **kwargs)

    compiled, graph_calls = compiled_pipeline
    pipes = []
    real_load = infer.load_pipeline

    def load(model, config):
        if config.jit:  # the shared compiled pipeline, with the scheduler load_pipeline would give it
            compiled.scheduler = infer.choose_scheduler(model, config)
            pipes.append(compiled)
        else:
            pipes.append(real_load(model, config))
        return pipes[-1]

    monkeypatch.setattr(getattr(diffusers, cls), "step", step)
    monkeypatch.setattr(infer, "load_pipeline", load)
    latents = []
    for model, flag, jit in ((own, None, False), (tiny_model, name, False), (tiny_model, name, True)):
        graph_calls.clear()
        path = run(cfg(model, tmp_path / f"{flag}-{jit}.npy", scheduler=flag, jit=jit, output_type="latent"))[0]
        scheduler = pipes[-1].scheduler
        assert type(scheduler).__name__ == cls
        assert steps == [cls] * len(scheduler.timesteps)
        assert len(graph_calls) == (len(scheduler.timesteps) if jit else 0)
        steps.clear()
        latents.append(np.load(path))
    if name == "dpm++":
        assert pipes[1].scheduler.config.algorithm_type == "dpmsolver++"
    own_lat, flag_lat, jit_lat = latents
    assert own_lat.shape == (4, 16, 16) and np.isfinite(own_lat).all() and own_lat.std() > 0
    np.testing.assert_array_equal(flag_lat, own_lat)
    np.testing.assert_allclose(jit_lat, own_lat, rtol=1e-4, atol=1e-4)


def test_latent_output(tiny_model, tmp_path, t2i_home):
    paths = run(cfg(tiny_model, tmp_path / "lat", output_type="latent", num_images_per_prompt=2))
    assert [p.suffix for p in paths] == [".npy", ".npy"]
    lat = np.load(paths[0])
    assert lat.shape == (4, 16, 16) and np.isfinite(lat).all()
    assert not np.array_equal(lat, np.load(paths[1]))


def test_never_overwrites_without_flag(tiny_model, tmp_path, t2i_home):
    target = tmp_path / "x.png"
    target.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        run(cfg(tiny_model, target))
    assert target.read_bytes() == b"keep me"
    run(cfg(tiny_model, target, overwrite=True))
    assert Image.open(target).size == (32, 32)


def test_missing_model_errors(tmp_path, t2i_home):
    with pytest.raises(ValueError, match="no trained model recorded"):
        run(cfg(None, tmp_path / "o"))
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        run(cfg(tmp_path, tmp_path / "o"))


def test_cli_uses_last_trained_model(tiny_model, tmp_path, t2i_home):
    t2i_home.mkdir(parents=True)
    (t2i_home / "last_model").write_text(str(tiny_model))
    out = tmp_path / "yoda.png"
    result = CliRunner().invoke(infer.cli, ["--prompt", "yoda", "--num_inference_steps", "2", "--height", "32",
                                            "--width", "32", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and out.is_file()
    again = CliRunner().invoke(infer.cli, ["--prompt", "yoda", "--output", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    two = CliRunner().invoke(infer.cli, ["--prompt", "a", "--prompt", "b", "--output", str(tmp_path / "one.png")])
    assert two.exit_code == 2 and "give a folder" in two.output


def test_guidance_negative_prompt_and_fp16_change_the_output(tiny_model, tmp_path, t2i_home):
    """--guidance_scale and --negative_prompt reach the sampler; fp16 samples close to fp32 but not bit-equal; bf16 on
    CPU is refused in one line."""
    kw = dict(output_type="latent", scheduler="ddim", guidance_scale=4.0)
    base = np.load(run(cfg(tiny_model, tmp_path / "base.npy", **kw))[0])
    other_guidance = np.load(run(cfg(tiny_model, tmp_path / "g.npy", **{**kw, "guidance_scale": 9.0}))[0])
    negative = np.load(run(cfg(tiny_model, tmp_path / "n.npy", negative_prompt="a blue square", **kw))[0])
    half = np.load(run(cfg(tiny_model, tmp_path / "h.npy", mixed_precision="fp16", **kw))[0])
    for changed in (other_guidance, negative):
        assert np.abs(changed - base).max() > 1e-2
    assert np.isfinite(half).all() and 0 < np.abs(half - base).max() < 0.05 * np.abs(base).max()
    with pytest.raises(ValueError, match="--mixed_precision bf16: MindSpore's CPU backend"):
        run(cfg(tiny_model, tmp_path / "b.npy", mixed_precision="bf16", **kw))


def test_prompt_weighting_is_read_unless_turned_off(tiny_model, tmp_path, t2i_home):
    """t2i-infer reads A1111's weights (t2i.interop.prompts, pinned in tests/test_prompts.py): a prompt without them samples
    what the pipeline's own encoding does (--no_prompt_weighting), a weight changes the sample, and so does the text
    past the first 77 tokens of a long prompt, which the pipeline alone truncates."""
    def latents(name, prompt, **kw):
        [path] = run(cfg(tiny_model, tmp_path / f"{name}.npy", prompt=(prompt,), output_type="latent", **kw))
        return np.load(path)

    plain = latents("plain", "a red circle")
    np.testing.assert_array_equal(plain, latents("unweighted", "a red circle", prompt_weighting=False))
    assert np.abs(latents("weighted", "a (red:1.6) circle") - plain).max() > 1e-3
    long = "a red circle " * 30  # 90 tokens
    assert np.abs(latents("long", long + "blue") - latents("long2", long + "green")).max() > 1e-3
    np.testing.assert_array_equal(latents("cut", long + "blue", prompt_weighting=False),
                                  latents("cut2", long + "green", prompt_weighting=False))
