"""--gradient_checkpointing (models.enable_gradient_checkpointing): the ResNet and transformer layers of the UNet's
blocks rerun their forward in the backward pass instead of keeping their activations. It must change memory, never
results: same loss and gradients, compiled (t2i-train's ms.jit graph) and op by op (PyNative)."""

import re
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np

from t2i.interop import models
from t2i.train import TrainConfig, run
from t2i.training import step
from t2i.training.optim import build_adamw

# Recomputing reruns the same kernels on the same inputs: PyNative gives the same bits, the compiled graph only fuses
# and orders kernels differently (measured: same loss, gradients within 1.5e-7 of each tensor's largest entry).
RTOL = 1e-5


def batch(unet, size, n, seed=0):
    """Noisy latents, timesteps, target, per-sample weights, text states: the train step's inputs (Batch.arrays)."""
    rng = np.random.default_rng(seed)
    latents = (n, unet.config.in_channels, size, size)
    noisy = ms.Tensor(rng.standard_normal(latents, dtype=np.float32))
    timesteps = ms.Tensor(rng.integers(0, 1000, n).astype(np.int32))
    states = ms.Tensor(rng.standard_normal((n, 8, unet.config.cross_attention_dim), dtype=np.float32))
    target = ms.Tensor(rng.standard_normal(latents, dtype=np.float32))
    return [noisy, timesteps, target, ms.Tensor(np.ones(n, np.float32)), states]


def forward_and_backward(unet, inputs, jit):
    """Loss and every gradient from the train step's forward+backward: t2i-train's ms.jit graph, or PyNative."""
    unet.set_train(True)
    train_step = step.build_train_step(unet, build_adamw(unet.trainable_params(), 1e-3), None, 1.0, 1, jit=jit)
    (loss, _), grads = train_step.forward_and_backward(*inputs)
    return loss.asnumpy(), [g.asnumpy() for g in grads]


def assert_same(plain, checkpointed):
    (loss, grads), (ck_loss, ck_grads) = plain, checkpointed
    np.testing.assert_allclose(ck_loss, loss, rtol=RTOL)
    assert len(ck_grads) == len(grads)
    for i, (g, ck) in enumerate(zip(grads, ck_grads)):
        np.testing.assert_allclose(ck, g, rtol=0, atol=RTOL * np.abs(g).max(), err_msg=f"gradient {i}")


def group_norms(unet):
    """Names of the UNet's GroupNorm cells, and of those inside the blocks' ResNet and transformer layers: every
    checkpointed layer has one or two, so they show whether each layer's forward runs again."""
    names = [name for name, cell in unet.cells_and_names() if type(cell).__name__ == "GroupNorm"]
    layer = re.compile(r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(resnets|attentions)\.")
    return names, [name for name in names if layer.match(name)]


def test_pynative_recomputes_layers_same_loss_and_gradients(tiny_model):
    plain, checkpointed = models.load_unet(tiny_model), models.load_unet(tiny_model)
    models.enable_gradient_checkpointing(checkpointed)
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    names, in_layers = group_norms(plain)
    assert len(in_layers) == 20 and len(names) == 21  # conv_norm_out is the one outside the blocks
    inputs = batch(plain, 16, 2)
    results, calls = [], []
    for unet in (plain, checkpointed):
        # PyNative runs each cell's Python as it executes: a recomputed layer calls its cells again in the backward.
        count = dict.fromkeys(names, 0)
        cells = dict(unet.cells_and_names())
        for name in names:
            cells[name].register_forward_hook(lambda cell, args, out, name=name: count.update({name: count[name] + 1}))
        results.append(forward_and_backward(unet, inputs, jit=False))
        calls.append(count)
    assert calls[0] == dict.fromkeys(names, 1)
    assert calls[1] == {name: 2 if name in in_layers else 1 for name in names}
    assert_same(*results)


def test_compiled_graph_recomputes_layers_same_loss_and_gradients(tiny_model, tmp_path, monkeypatch):
    """The compiled graph is read from MindSpore's IR dump of its last compile pass (validate): a recomputed kernel is
    a forward kernel copied into the backward pass, so the graph has more GroupNorms than GroupNorm gradients."""
    monkeypatch.setenv("MS_DEV_DUMP_IR_PASSES", "validate")  # that pass only: all of them is ~400 MB per compile
    results, kernels = [], []
    for checkpointing in (False, True):
        unet = models.load_unet(tiny_model)
        if checkpointing:
            models.enable_gradient_checkpointing(unet)
        folder = tmp_path / f"ir-{checkpointing}"
        ms.set_context(save_graphs=1, save_graphs_path=str(folder))
        try:
            results.append(forward_and_backward(unet, batch(unet, 16, 2), jit=True))
        finally:
            ms.set_context(save_graphs=0)
        [ir] = folder.glob("*validate*.ir")
        text = ir.read_text()
        kernels.append((text.count("= PrimFunc_GroupNorm("), text.count("= PrimFunc_GroupNormGrad(")))
    names, in_layers = group_norms(unet)
    assert kernels[0] == (len(names), len(names))
    assert kernels[1] == (len(names) + len(in_layers), len(names))
    assert_same(*results)


def test_pynative_fp16_step_with_checkpointing_matches_plain_one(tiny_model):
    """--no_jit --mixed_precision fp16: a train step (O2 and dynamic loss scaling: step.mixed_precision) gives the
    plain step's loss and grad norm and leaves the loss scale as it was. (With use_reentrant=False, PyNative went on
    computing in fp16 after the backward pass: the scale 65536 became inf, the loss read 0 and later steps were
    skipped.) One step each: a PyNative fp16 step takes ~10 s on CPU."""
    records = []
    for checkpointing in (False, True):
        unet = models.load_unet(tiny_model)
        if checkpointing:
            models.enable_gradient_checkpointing(unet)
        unet.set_train(True)
        step_net, loss_scaler = step.mixed_precision(unet, ms.float16)
        train_step = step.build_train_step(step_net, build_adamw(unet.trainable_params(), 1e-3), loss_scaler, 1.0, 1,
                                           jit=False)
        loss, grad_norm, stepped = train_step(*batch(unet, 16, 2))
        records.append((float(loss.asnumpy()), float(grad_norm.asnumpy()), bool(stepped),
                        float(train_step.grad_scaler.loss_scaler.scale_value.asnumpy())))
    plain, checkpointed = records
    assert plain[2:] == checkpointed[2:] == (True, 2.0**16)
    # The rerun rounds a little differently in fp16 (measured: gradients within 2e-3 of each tensor's largest entry;
    # fp16 against fp32 differs by 4e-2).
    np.testing.assert_allclose(checkpointed[:2], plain[:2], rtol=1e-3)


def peak_rss_growth_mb(model, checkpointing):
    out = subprocess.run([sys.executable, __file__, str(model), str(checkpointing)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.split()[-1])


def test_pynative_checkpointing_lowers_peak_memory(tiny_model):
    """Peak RSS of one PyNative forward+backward at batch 4, 32x32 latents, each in a fresh process: measured ~1120 ->
    ~750 MB above the RSS before it. (Compiled on CPU it rises instead, ~+13%: the graph does recompute, as the test
    above shows, but MindSpore's CPU backend gains no memory from it.)"""
    plain = peak_rss_growth_mb(tiny_model, False)
    checkpointed = peak_rss_growth_mb(tiny_model, True)
    assert checkpointed < 0.85 * plain, (plain, checkpointed)


def test_train_with_gradient_checkpointing(tiny_model, tiny_store, tmp_path, t2i_home):
    """`t2i-train --gradient_checkpointing` (compiled, the default) trains a step whose loss and grad norm are those
    of a plain (PyNative, no checkpointing) run."""
    kw = dict(pretrained_model_name_or_path=str(tiny_model), latent_store=str(tiny_store), train_batch_size=4,
              max_train_steps=1, checkpointing_steps=10, report_to="none", num_validation_samples=4)
    checkpointed = run(TrainConfig(output_dir=str(tmp_path / "checkpointed"), gradient_checkpointing=True, **kw))
    plain = run(TrainConfig(output_dir=str(tmp_path / "plain"), jit=False, **kw))
    [ck], [pl] = checkpointed["history"], plain["history"]
    assert ck["step"] == 1 and ck["skipped_steps"] == 0
    np.testing.assert_allclose([ck["loss"], ck["grad_norm"]], [pl["loss"], pl["grad_norm"]], rtol=RTOL)
    assert (Path(checkpointed["output_dir"]) / "unet" / "diffusion_pytorch_model.safetensors").is_file()


if __name__ == "__main__":
    # peak_rss_growth_mb's child: python test_checkpointing.py MODEL_DIR True|False prints by how many MB one PyNative
    # forward+backward raises the process's peak RSS (VmHWM) over its RSS just before.
    from t2i.core import runtime

    runtime.setup("CPU")
    unet = models.load_unet(sys.argv[1])
    if sys.argv[2] == "True":
        models.enable_gradient_checkpointing(unet)
    inputs = batch(unet, 32, 4)

    def status_mb(key):
        return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1]) / 1024

    before = status_mb("VmRSS")
    forward_and_backward(unet, inputs, jit=False)
    print(status_mb("VmHWM") - before)
