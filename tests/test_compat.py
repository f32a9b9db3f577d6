"""t2i.core.compat: each check of what the installed MindSpore offers switches its workaround on exactly when needed,
the workarounds compute what MindSpore's own ops do, and --device_target GPU ends in one line with exit code 2.
Run by `make test` (MindSpore 2.10) and `make test-ms27` (2.7.1)."""

import os
import subprocess
import sys
import types
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import mint, nn

from t2i.core import compat, cpu_ops, runtime
from t2i.interop import models

BIN = Path(sys.executable).parent


# ---------------------------------------------------------------- gradient checkpointing


def test_mindone_gradient_checkpointing_is_whether_cell_has_recompute_(monkeypatch):
    assert compat.mindone_gradient_checkpointing() == hasattr(nn.Cell, "recompute_")
    monkeypatch.setattr(nn.Cell, "recompute_", lambda self, mode=True: None, raising=False)
    assert compat.mindone_gradient_checkpointing()
    monkeypatch.delattr(nn.Cell, "recompute_")
    assert not compat.mindone_gradient_checkpointing()


class _Layer:
    def __init__(self):
        self.recomputed = 0

    def recompute(self):
        self.recomputed += 1


def _fake_unet():
    block = types.SimpleNamespace(gradient_checkpointing=False, resnets=[_Layer(), _Layer()], attentions=[_Layer()])
    plain = types.SimpleNamespace()  # a cell that is no diffusers block: left alone
    unet = types.SimpleNamespace(cells_and_names=lambda: [("down_blocks.0", block), ("conv_in", plain)], called=[])
    unet.enable_gradient_checkpointing = lambda: unet.called.append("mindone")
    return unet, block


def test_gradient_checkpointing_takes_mindones_call_only_where_cell_has_recompute_(monkeypatch):
    monkeypatch.setattr(compat, "mindone_gradient_checkpointing", lambda: True)
    unet, block = _fake_unet()
    models.enable_gradient_checkpointing(unet)
    assert unet.called == ["mindone"]  # what mindone's train_text_to_image.py does
    assert [layer.recomputed for layer in (*block.resnets, *block.attentions)] == [0, 0, 0]

    monkeypatch.setattr(compat, "mindone_gradient_checkpointing", lambda: False)
    unet, block = _fake_unet()
    models.enable_gradient_checkpointing(unet)
    assert unet.called == []
    assert [layer.recomputed for layer in (*block.resnets, *block.attentions)] == [1, 1, 1]
    assert block.gradient_checkpointing


# ---------------------------------------------------------------- mint ops in ms.jit graphs on CPU


PROBE = """
import mindspore as ms
from mindspore import mint
ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
from t2i.core import compat
x = ms.Tensor([[1.0, 2.0, 3.0, 4.0]])
def split(x):
    return mint.split(x, [1, 3], dim=1)[1]
def chunk(x):
    return mint.chunk(x, 2, 1)[1]
def narrow(x):
    return mint.narrow(x, 1, 1, 2)
failed = []
for fn in (split, chunk, narrow):
    try:
        ms.jit(fn)(x).asnumpy()
    except RuntimeError as e:
        assert "Unsupported op" in str(e), str(e)
        failed.append(fn.__name__)
print(",".join(compat.cpu_graph_ops_missing()), ",".join(failed), sep="|")
"""


def test_cpu_graph_ops_missing_names_the_mint_ops_mindspore_cannot_compile_on_cpu(tmp_path):
    """In a fresh process (nothing substituted yet): the probe's answer is what compiling each mint op in a graph
    shows (MindSpore 2.7.1: split, chunk, narrow; 2.10.0: none)."""
    script = tmp_path / "probe.py"  # ms.jit reads its functions' source from a file
    script.write_text(PROBE)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    probed, failed = out.stdout.strip().splitlines()[-1].split("|")
    assert probed == failed
    assert set(filter(None, probed.split(","))) <= set(compat.GRAPH_OPS)


def test_install_substitutes_exactly_the_missing_graph_ops():
    missing = compat.cpu_graph_ops_missing()  # cached: asked before install replaced anything (conftest's setup)
    for name, substitute in cpu_ops.MINT_GRAPH.items():
        assert (getattr(mint, name) is substitute) == (name in missing), name
    if "split" in missing:
        from mindone.diffusers.models import embeddings

        assert embeddings.mint.split is cpu_ops.split  # the timestep embedding's split, in the UNet's graph


@pytest.mark.parametrize("sections", [[1, 3], (2, 2), 3, 4])
def test_split_substitute_in_a_graph_values_and_gradient(sections):
    x = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
    sizes = sections if not isinstance(sections, int) else [min(sections, 4 - i) for i in range(0, 4, sections)]
    want = np.split(x, np.cumsum(sizes)[:-1], axis=1)

    def parts(t):
        return cpu_ops.split(t, sections, 1)

    def weighted(t):
        pieces = cpu_ops.split(t, sections, 1)
        total = pieces[0].sum()
        for i in range(1, len(pieces)):
            total = total + pieces[i].sum() * (i + 1)
        return total

    got = ms.jit(parts)(ms.Tensor(x))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.asnumpy(), w)
    grad = ms.jit(ms.grad(weighted))(ms.Tensor(x)).asnumpy()
    np.testing.assert_array_equal(grad, np.concatenate([np.full(w.shape, i + 1.0) for i, w in enumerate(want)], 1))


def test_chunk_and_narrow_substitutes_in_a_graph():
    x = np.arange(30, dtype=np.float32).reshape(2, 5, 3)

    def pieces(t):
        first, second = cpu_ops.chunk(t, 2, 1)
        return first, second, cpu_ops.narrow(t, -2, 1, 3), cpu_ops.narrow(t, 2, 0, 1), cpu_ops.narrow(t, 1, -2, 2)

    def narrowed_sum(t):
        return cpu_ops.narrow(t, 1, 1, 3).sum()

    got = [t.asnumpy() for t in ms.jit(pieces)(ms.Tensor(x))]
    want = np.array_split(x, [3], axis=1) + [x[:, 1:4], x[:, :, 0:1], x[:, 3:5]]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    grad = ms.jit(ms.grad(narrowed_sum))(ms.Tensor(x)).asnumpy()
    want_grad = np.zeros_like(x)
    want_grad[:, 1:4] = 1
    np.testing.assert_array_equal(grad, want_grad)


def test_the_unets_timestep_embedding_compiles_on_cpu():
    """What broke every compiled step on MindSpore 2.7.1 CPU: mindone's get_timestep_embedding (mint.split) in a
    graph."""
    from mindone.diffusers.models.embeddings import get_timestep_embedding

    def embed(t):
        return get_timestep_embedding(t, 8, flip_sin_to_cos=True, downscale_freq_shift=0)

    t = ms.Tensor(np.array([1, 500], np.int32))
    np.testing.assert_allclose(ms.jit(embed)(t).asnumpy(), embed(t).asnumpy(), rtol=1e-6, atol=1e-6)


def test_cpu_graph_ops_probe_compiles_nothing_in_msruns_scheduler(monkeypatch):
    """Any ms.jit compile before init() made msrun's scheduler process abort at exit and msrun fail the job
    (tests/test_distributed.py runs msrun)."""
    monkeypatch.setenv("MS_ROLE", "MS_SCHED")
    monkeypatch.setattr(ms, "jit", lambda *a, **k: pytest.fail("compiled in msrun's scheduler"))
    assert compat.msrun_scheduler()
    assert compat.cpu_graph_ops_missing.__wrapped__() == ()  # uncached: this process's answer stays as install saw it


# ---------------------------------------------------------------- mint.nn classes whose __init__ names itself

SELF_NAMING = """
from t2i.core import compat, cpu_ops
print("names:" + ",".join(compat.mint_nn_inits_naming_themselves(tuple(cpu_ops.MINT_NN))))
"""


def test_mint_nn_inits_naming_themselves_reads_the_installed_classes():
    """In a fresh process, nothing replaced yet (MindSpore 2.7.1: GELU; 2.10.0: none)."""
    out = subprocess.run([sys.executable, "-c", SELF_NAMING], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    [line] = [line for line in out.stdout.splitlines() if line.startswith("names:")]
    found = [name for name in line[len("names:"):].split(",") if name]
    assert set(found) <= set(cpu_ops.MINT_NN)
    for name in found:  # here install has run: the substitute is mint's class under that name
        assert getattr(mint.nn, name) is cpu_ops.MINT_NN[name]


def test_the_gelu_substitute_and_mindones_gelu_class_both_build():
    """mindone's ACT2CLS holds mint's own GELU class (bound at import, before install): both it and the substitute
    build (on 2.7 either recursed or failed in super(GELU, self) before _bind_own_name)."""
    from mindone.diffusers.models import activations

    x = ms.Tensor(np.linspace(-3, 3, 7, dtype=np.float32))
    substitute = mint.nn.GELU(approximate="tanh")
    assert isinstance(substitute, cpu_ops.GELU) and substitute.approximate == "tanh"
    np.testing.assert_allclose(substitute(x).asnumpy(), cpu_ops.gelu(x, "tanh").asnumpy(), rtol=1e-6)
    assert activations.ACT2CLS["gelu"]().approximate == "none"


# ---------------------------------------------------------------- GPU


def test_gpu_plugins_are_the_wheels_cuda_builds_and_the_refusal_names_them():
    plugins = Path(ms.__file__).parent / "lib" / "plugin"
    versions = compat.gpu_plugins()
    assert versions == sorted(p.name.split(".so.")[1] for p in plugins.glob("libmindspore_gpu.so.*"))
    message = compat.gpu_refusal()
    assert "\n" not in message and message.startswith("--device_target / MS_DEVICE_TARGET: GPU is not supported")
    assert f"CUDA {', '.join(versions) or 'none'} only" in message


@pytest.mark.parametrize("name", ["GPU", "gpu"])
def test_setup_refuses_gpu_before_mindspore_is_asked(name):
    with pytest.raises(ValueError) as refused:
        runtime.setup(name)
    assert str(refused.value) == compat.gpu_refusal()
    assert ms.get_context("device_target") == "CPU"  # this process is untouched


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_gpu_on_the_command_line_is_one_line_and_exit_code_2(tmp_path, how):
    """What a user sees on this machine (no GPU, no CUDA): MindSpore itself would print libcuda/libcudnn errors and
    "RuntimeError: Unsupported device target GPU" with a C++ call stack."""
    out = tmp_path / "tiny"
    args = [str(BIN / "t2i-tiny-model"), "--output_dir", str(out)]
    env = dict(os.environ)
    if how == "flag":
        args += ["--device_target", "GPU"]
    else:
        env["MS_DEVICE_TARGET"] = "GPU"
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert lines == [f"error: {compat.gpu_refusal()}"], result.stderr[-3000:]
    assert not out.exists()
