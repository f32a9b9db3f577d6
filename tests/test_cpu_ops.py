"""Every substitute in t2i.core.cpu_ops against a NumPy reference written here: values, and gradients for the
differentiable ones (MindSpore autodiff vs float64 central differences of the NumPy reference)."""

import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import mint

from t2i.core import cpu_ops

RNG = np.random.default_rng(0)


def t(a, dtype=ms.float32):
    return ms.Tensor(np.asarray(a), dtype)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def numeric_grads(ref, args, cot, eps=1e-6):
    """Gradients of sum(ref(*args) * cot) wrt every array in args, by float64 central differences."""
    args = [np.array(a, np.float64) for a in args]
    cot = np.asarray(cot, np.float64)
    grads = []
    for a in args:
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + eps
            hi = np.sum(ref(*args) * cot)
            a[idx] = old - eps
            lo = np.sum(ref(*args) * cot)
            a[idx] = old
            g[idx] = (hi - lo) / (2 * eps)
        grads.append(g)
    return grads


def ms_grads(fn, args, cot):
    """MindSpore gradients of sum(fn(*args) * cot) wrt every argument."""
    cot_t = t(cot)

    def loss(*xs):
        return (fn(*xs) * cot_t).sum()

    grads = ms.grad(loss, grad_position=tuple(range(len(args))))(*[t(a) for a in args])
    if len(args) == 1:  # ms.grad returns a bare tensor, not a 1-tuple, for a single position
        grads = (grads,)
    return [g.asnumpy() for g in grads]


def jit_grads(fn, args, cot):
    """ms_grads of a one- or two-argument fn, computed inside one ms.jit graph as train's compiled step computes them
    (ms.jit takes neither *args nor a lambda sharing its line)."""
    cot_t = t(cot)

    def loss1(x):
        return (fn(x) * cot_t).sum()

    def loss2(x, w):
        return (fn(x, w) * cot_t).sum()

    @ms.jit
    def grads1(x):
        return ms.grad(loss1, grad_position=0)(x)

    @ms.jit
    def grads2(x, w):
        return ms.grad(loss2, grad_position=(0, 1))(x, w)

    if len(args) == 1:
        return [grads1(t(args[0])).asnumpy()]
    return [g.asnumpy() for g in grads2(t(args[0]), t(args[1]))]


def check_compiled(fn, ref, args):
    """fn's gradients inside an ms.jit graph match ref's numeric ones."""
    cot = randn(*ref(*[np.asarray(a, np.float64) for a in args]).shape)
    for got, want in zip(jit_grads(fn, args, cot), numeric_grads(ref, args, cot)):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def check(fn, ref, args, rtol=1e-4, atol=1e-5, grad_atol=1e-4):
    """fn (MindSpore, float32) matches ref (NumPy, float64) in value and in gradient wrt all args."""
    out = fn(*[t(a) for a in args]).asnumpy()
    expected = ref(*[np.asarray(a, np.float64) for a in args])
    np.testing.assert_allclose(out, expected, rtol=rtol, atol=atol)
    cot = randn(*expected.shape)
    got_grads, want_grads = ms_grads(fn, args, cot), numeric_grads(ref, args, cot)
    assert len(got_grads) == len(want_grads)
    for got, want in zip(got_grads, want_grads):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=grad_atol)


def test_install_routes_every_table_entry():
    for namespace, table in ((mint, cpu_ops.MINT), (mint.nn, cpu_ops.MINT_NN), (mint.nn.functional, cpu_ops.MINT_F)):
        for name, substitute in table.items():
            assert getattr(namespace, name) is substitute, name
    assert ms.Tensor.clone is cpu_ops._clone
    assert ms.Tensor.nonzero is cpu_ops._tensor_nonzero
    from mindone.diffusers.models import layers_compat

    assert layers_compat.pad is cpu_ops.pad


# ---------------------------------------------------------------- conv2d


def conv2d_ref(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    sh, sw = cpu_ops._pair(stride)
    dh, dw = cpu_ops._pair(dilation)
    ph, pw = cpu_ops._pair(padding)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    og = o // groups
    out = np.zeros((n, o, ho, wo), np.result_type(x, w))
    for g in range(groups):
        xg = xp[:, g * cg : (g + 1) * cg]
        wg = w[g * og : (g + 1) * og]
        for i in range(kh):
            for j in range(kw):
                patch = xg[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
                out[:, g * og : (g + 1) * og] += np.einsum("nchw,oc->nohw", patch, wg[:, :, i, j])
    if b is not None:
        out = out + b.reshape(1, -1, 1, 1)
    return out


CONV_CASES = [
    # (x shape, w shape, stride, padding, dilation, groups)
    ((2, 3, 6, 6), (4, 3, 3, 3), 1, 1, 1, 1),
    ((1, 3, 7, 7), (4, 3, 3, 3), 2, 1, 1, 1),
    ((1, 2, 6, 5), (3, 2, 3, 3), 2, 0, 1, 1),
    ((2, 3, 5, 5), (4, 3, 1, 1), 1, 0, 1, 1),
    ((1, 3, 5, 4), (2, 3, 1, 1), 2, 0, 1, 1),
    ((1, 4, 6, 6), (6, 2, 3, 3), 1, 1, 1, 2),
    ((1, 2, 7, 7), (2, 2, 3, 3), 1, 2, 2, 1),
    ((1, 2, 6, 6), (3, 2, 2, 3), (1, 2), (1, 0), 1, 1),
]


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups", CONV_CASES)
def test_conv2d(xs, ws, stride, padding, dilation, groups):
    x, w, b = randn(*xs), randn(*ws), randn(ws[0])
    check(
        lambda x, w, b: cpu_ops.conv2d(x, w, b, stride, padding, dilation, groups),
        lambda x, w, b: conv2d_ref(x, w, b, stride, padding, dilation, groups),
        [x, w, b],
    )


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups", CONV_CASES)
def test_conv2d_in_bands_of_output_rows(monkeypatch, xs, ws, stride, padding, dilation, groups):
    """An im2col above IM2COL_BYTES is done in bands of output rows (here one or two rows each, as at 512 px)."""
    n, c, _, _ = xs
    monkeypatch.setattr(cpu_ops, "IM2COL_BYTES", 2 * n * ws[1] * ws[2] * ws[3] * xs[3] * 4 - 1)
    x, w, b = randn(*xs), randn(*ws), randn(ws[0])
    check(
        lambda x, w, b: cpu_ops.conv2d(x, w, b, stride, padding, dilation, groups),
        lambda x, w, b: conv2d_ref(x, w, b, stride, padding, dilation, groups),
        [x, w, b],
    )


@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_in_bands_compiled(monkeypatch, stride):
    monkeypatch.setattr(cpu_ops, "IM2COL_BYTES", 2000)  # bands of 2-3 output rows here
    x, w = randn(2, 3, 9, 9), randn(4, 3, 3, 3)

    def conv(x, w):
        return cpu_ops.conv2d(x, w, None, stride, 1)

    check_compiled(conv, lambda x, w: conv2d_ref(x, w, None, stride, 1), [x, w])


def test_conv2d_without_bias_and_string_padding():
    x, w = randn(1, 2, 5, 5), randn(3, 2, 3, 3)
    np.testing.assert_allclose(
        cpu_ops.conv2d(t(x), t(w), padding="same").asnumpy(), conv2d_ref(x, w, padding=1), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        cpu_ops.conv2d(t(x), t(w), padding="valid").asnumpy(), conv2d_ref(x, w), rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ValueError):
        cpu_ops.conv2d(t(x), t(w), padding="full")


def cell_grads(cell, x, cot):
    cot_t = t(cot)

    def loss(x):
        return (cell(x) * cot_t).sum()

    params = cell.trainable_params()
    (gx, gparams) = ms.value_and_grad(loss, grad_position=0, weights=params)(t(x))[1]
    return gx.asnumpy(), {p.name: g.asnumpy() for p, g in zip(params, gparams)}


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0)])
def test_conv2d_cell_values_and_grads(stride, padding):
    cell = mint.nn.Conv2d(3, 4, 3, stride=stride, padding=padding)
    assert isinstance(cell, cpu_ops.Conv2d)
    x = randn(2, 3, 6, 6)
    w, b = cell.weight.asnumpy(), cell.bias.asnumpy()
    ref = lambda x, w, b: conv2d_ref(x, w, b, stride, padding)  # noqa: E731
    expected = ref(x, w, b)
    np.testing.assert_allclose(cell(t(x)).asnumpy(), expected, rtol=1e-4, atol=1e-5)
    cot = randn(*expected.shape)
    gx, gp = cell_grads(cell, x, cot)
    nx, nw, nb = numeric_grads(ref, [x, w, b], cot)
    np.testing.assert_allclose(gx, nx, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gp[cell.weight.name], nw, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gp[cell.bias.name], nb, rtol=1e-3, atol=1e-4)


def test_conv2d_cell_reflect_padding():
    cell = mint.nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=False)
    x = randn(1, 2, 5, 5)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    np.testing.assert_allclose(
        cell(t(x)).asnumpy(), conv2d_ref(xp, cell.weight.asnumpy()), rtol=1e-4, atol=1e-5
    )


# ---------------------------------------------------------------- linear


@pytest.mark.parametrize("xs", [(5, 3), (2, 4, 3), (2, 2, 2, 3), (3,)])
def test_linear(xs):
    x, w, b = randn(*xs), randn(4, 3), randn(4)
    check(cpu_ops.linear, lambda x, w, b: x @ w.T + b, [x, w, b])
    check(lambda x, w: cpu_ops.linear(x, w), lambda x, w: x @ w.T, [x, w])


@pytest.mark.parametrize("bias", [True, False])
def test_linear_cell(bias):
    cell = mint.nn.Linear(3, 4, bias=bias)
    assert isinstance(cell, cpu_ops.Linear)
    x = randn(2, 5, 3)
    w = cell.weight.asnumpy()
    b = cell.bias.asnumpy() if bias else np.zeros(4, np.float32)
    expected = x @ w.T + b
    np.testing.assert_allclose(cell(t(x)).asnumpy(), expected, rtol=1e-4, atol=1e-5)
    cot = randn(*expected.shape)
    gx, gp = cell_grads(cell, x, cot)
    nx, nw, nb = numeric_grads(lambda x, w, b: x @ w.T + b, [x, w, b], cot)
    np.testing.assert_allclose(gx, nx, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gp[cell.weight.name], nw, rtol=1e-3, atol=1e-4)
    if bias:
        np.testing.assert_allclose(gp[cell.bias.name], nb, rtol=1e-3, atol=1e-4)
    assert len(gp) == (2 if bias else 1)


# ---------------------------------------------------------------- pad


@pytest.mark.parametrize("value", [None, 1.5])
def test_pad_constant(value):
    x = randn(2, 3, 4)
    np_pad = ((0, 0), (2, 0), (1, 3))
    check(
        lambda x: cpu_ops.pad(x, [1, 3, 2, 0], value=value),
        lambda x: np.pad(x, np_pad, constant_values=0.0 if value is None else value),
        [x],
    )


@pytest.mark.parametrize(
    "pads,np_pad",
    [
        ((0, 1, 0, 1), ((0, 0), (0, 0), (0, 1), (0, 1))),
        ((2, 0), ((0, 0), (0, 0), (0, 0), (2, 0))),
        ((1, 1, 0, 0, 2, 1), ((0, 0), (2, 1), (0, 0), (1, 1))),
        ((0, 0, 0, 0), ((0, 0), (0, 0), (0, 0), (0, 0))),
    ],
)
def test_pad_constant_four_dim(pads, np_pad):
    x = randn(2, 3, 4, 5)
    check(lambda x: cpu_ops.pad(x, pads), lambda x: np.pad(x, np_pad), [x])


def test_pad_constant_compiled():
    """Inside an ms.jit graph the gradient reaches the input (a list.insert once made the input a constant there)."""
    def padded(x):
        return cpu_ops.pad(x, (1, 2, 2, 1))

    check_compiled(padded, lambda x: np.pad(x, ((0, 0), (0, 0), (2, 1), (1, 2))), [randn(2, 3, 4, 5)])


def test_pad_negative_crops():
    x = randn(1, 2, 5, 6)
    check(
        lambda x: cpu_ops.pad(x, (-1, 2, 0, -2)),
        lambda x: np.pad(x[:, :, :-2, 1:], ((0, 0), (0, 0), (0, 0), (0, 2))),
        [x],
    )


def test_pad_keeps_integer_dtype():
    x = np.arange(6).reshape(2, 3)
    out = cpu_ops.pad(t(x, ms.int32), (1, 0), value=7)
    assert out.dtype == ms.int32
    np.testing.assert_array_equal(out.asnumpy(), np.pad(x, ((0, 0), (1, 0)), constant_values=7))


def test_pad_reflect_and_replicate():
    x = randn(1, 2, 4, 5)
    for mode, np_mode in (("reflect", "reflect"), ("replicate", "edge")):
        check(
            lambda x: cpu_ops.pad(x, (1, 2, 2, 1), mode=mode),
            lambda x: np.pad(x, ((0, 0), (0, 0), (2, 1), (1, 2)), mode=np_mode),
            [x],
        )


# ---------------------------------------------------------------- creation ops


def test_arange():
    np.testing.assert_array_equal(cpu_ops.arange(5).asnumpy(), np.arange(5))
    np.testing.assert_array_equal(cpu_ops.arange(2, 11, 3).asnumpy(), np.arange(2, 11, 3))
    out = cpu_ops.arange(0, 1, 0.25, dtype=ms.float32)
    assert out.dtype == ms.float32
    np.testing.assert_allclose(out.asnumpy(), np.arange(0, 1, 0.25))
    assert cpu_ops.arange(0, 4, dtype=ms.int32).dtype == ms.int32


def test_linspace():
    out = cpu_ops.linspace(-1.0, 3.0, 9)
    assert out.dtype == ms.float32
    np.testing.assert_allclose(out.asnumpy(), np.linspace(-1, 3, 9), rtol=1e-6)
    assert cpu_ops.linspace(0, 1, 3, dtype=ms.float16).dtype == ms.float16
    np.testing.assert_allclose(cpu_ops.linspace(0, 999, 5).asnumpy(), np.linspace(0, 999, 5), rtol=1e-6)


def test_full():
    out = cpu_ops.full((2, 3), 1.5)
    assert out.dtype == ms.float32 and out.shape == (2, 3)
    np.testing.assert_array_equal(out.asnumpy(), np.full((2, 3), 1.5))
    assert cpu_ops.full([4], 7).dtype == ms.int64
    np.testing.assert_array_equal(cpu_ops.full([4], 7).asnumpy(), np.full(4, 7))
    assert cpu_ops.full((1,), 2, dtype=ms.float16).dtype == ms.float16


@pytest.mark.parametrize("fn,value", [(cpu_ops.ones_like, 1), (cpu_ops.zeros_like, 0)])
def test_ones_zeros_like(fn, value):
    x = t(randn(2, 3))
    out = fn(x)
    assert out.dtype == ms.float32 and out.shape == (2, 3)
    np.testing.assert_array_equal(out.asnumpy(), np.full((2, 3), value))
    assert fn(x, dtype=ms.int32).dtype == ms.int32


# ---------------------------------------------------------------- normalisation and activations


def layer_norm_ref(x, w=None, b=None, eps=1e-5, ndim=1):
    axes = tuple(range(-ndim, 0))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + eps)
    if w is not None:
        out = out * w
    if b is not None:
        out = out + b
    return out


def test_layer_norm_functional():
    x, w, b = randn(3, 4, 6), randn(6), randn(6)
    check(lambda x, w, b: cpu_ops.layer_norm(x, (6,), w, b), lambda x, w, b: layer_norm_ref(x, w, b), [x, w, b])
    check(lambda x: cpu_ops.layer_norm(x, (4, 6), eps=1e-3), lambda x: layer_norm_ref(x, eps=1e-3, ndim=2), [x])


def test_layer_norm_keeps_half_dtype():
    x = randn(2, 8)
    out = cpu_ops.layer_norm(t(x, ms.float16), (8,))
    assert out.dtype == ms.float16
    np.testing.assert_allclose(out.asnumpy(), layer_norm_ref(x.astype(np.float16).astype(np.float64)), atol=5e-3)


def test_layer_norm_cell():
    cell = mint.nn.LayerNorm(6)
    assert isinstance(cell, cpu_ops.LayerNorm)
    cell.weight.set_data(t(randn(6)))
    cell.bias.set_data(t(randn(6)))
    x = randn(2, 3, 6)
    w, b = cell.weight.asnumpy(), cell.bias.asnumpy()
    expected = layer_norm_ref(x, w, b)
    np.testing.assert_allclose(cell(t(x)).asnumpy(), expected, rtol=1e-4, atol=1e-5)
    cot = randn(*expected.shape)
    gx, gp = cell_grads(cell, x, cot)
    nx, nw, nb = numeric_grads(layer_norm_ref, [x, w, b], cot)
    np.testing.assert_allclose(gx, nx, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gp[cell.weight.name], nw, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gp[cell.bias.name], nb, rtol=1e-3, atol=1e-4)


def group_norm_ref(x, w, b, groups, eps=1e-5):
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    out = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)).reshape(x.shape)
    return out * w.reshape(1, c, 1, 1) + b.reshape(1, c, 1, 1)


def test_group_norm_cell_in_fp32_and_under_fp16_in_a_graph():
    """Same function as mint's GroupNorm; fp16 input with fp32 weights (amp O2) also compiles with ms.jit."""
    cell = mint.nn.GroupNorm(2, 4)
    assert isinstance(cell, cpu_ops.GroupNorm)
    cell.weight.set_data(t(randn(4)))
    cell.bias.set_data(t(randn(4)))
    w, b = cell.weight.asnumpy().astype(np.float64), cell.bias.asnumpy().astype(np.float64)
    x = randn(2, 4, 3, 3)
    check(cell, lambda x: group_norm_ref(x, w, b, 2), [x])
    half = ms.jit(cell.construct)(t(x, ms.float16))
    assert half.dtype == ms.float16
    np.testing.assert_allclose(half.asnumpy(), group_norm_ref(x.astype(np.float16).astype(np.float64), w, b, 2),
                               atol=1e-2)


def test_conv_and_linear_take_fp32_weights_with_fp16_inputs_in_a_graph():
    conv, lin = mint.nn.Conv2d(3, 4, 3, padding=1), mint.nn.Linear(5, 2)
    x, y = randn(1, 3, 4, 4), randn(2, 5)
    for cell, inp in ((conv, x), (lin, y)):
        ref = cell(t(inp)).asnumpy()
        half = ms.jit(cell.construct)(t(inp, ms.float16))
        assert half.dtype == ms.float16
        np.testing.assert_allclose(half.asnumpy(), ref, atol=3e-2, rtol=1e-2)


def gelu_ref(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    x = randn(3, 7) * 2
    check(lambda x: cpu_ops.gelu(x, approximate), lambda x: gelu_ref(x, approximate), [x])
    check(lambda x: cpu_ops.gelu(x, approximate=approximate), lambda x: gelu_ref(x, approximate), [x])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_cell(approximate):
    cell = mint.nn.GELU(approximate=approximate)
    assert isinstance(cell, cpu_ops.GELU)
    x = randn(4, 5) * 2
    check(cell, lambda x: gelu_ref(x, approximate), [x])


def test_geglu_in_graph_mode():
    """mindone's GEGLU, in PyNative and compiled by ms.jit (where Tensor.chunk has no CPU kernel), = NumPy."""
    from mindone.diffusers.models.activations import GEGLU

    cell = GEGLU(3, 4)
    w, b = cell.proj.weight.asnumpy().astype(np.float64), cell.proj.bias.asnumpy().astype(np.float64)

    def ref(x):
        proj = x @ w.T + b
        return proj[..., :4] * gelu_ref(proj[..., 4:])

    x = randn(2, 5, 3)
    np.testing.assert_allclose(ms.jit(cell.construct)(t(x)).asnumpy(), ref(x), rtol=1e-4, atol=1e-5)
    check(cell, ref, [x])


def softmax_ref(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("shape,dim", [((2, 3, 5), -1), ((2, 3, 5), 2), ((4, 6), -1), ((7,), 0), ((2, 3, 5), 1)])
def test_softmax(shape, dim):
    x = randn(*shape) * 3
    check(lambda x: cpu_ops.softmax(x, dim), lambda x: softmax_ref(x, dim), [x])
    check(lambda x: cpu_ops.softmax(x, dim=dim), lambda x: softmax_ref(x, dim), [x])


def test_softmax_dtype_argument():
    x = randn(3, 4)
    out = cpu_ops.softmax(t(x, ms.float16), -1, dtype=ms.float32)
    assert out.dtype == ms.float32
    np.testing.assert_allclose(out.asnumpy(), softmax_ref(x.astype(np.float16).astype(np.float64)), atol=1e-6)


def test_softmax_attention_shape_gradient():
    """The shape the UNet's attention uses, with scores large enough that a wrong row-sum broadcast would show."""
    x, cot = randn(2, 16, 16) * 4, randn(2, 16, 16)
    y = softmax_ref(x.astype(np.float64))
    want = y * (cot - (y * cot).sum(-1, keepdims=True))  # analytic softmax backward
    (got,) = ms_grads(lambda x: cpu_ops.softmax(x, -1), [x], cot)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def attention_ref(q, k, v, mask=None):
    scores = q @ np.swapaxes(k, -1, -2)
    if mask is not None:
        scores = scores + mask
    return softmax_ref(scores) @ v


@pytest.mark.parametrize("lq,lk", [(5, 5), (6, 3)])
def test_attention_core(lq, lk):
    q, k, v = randn(3, lq, 4), randn(3, lk, 4), randn(3, lk, 4)
    check(lambda q, k, v: cpu_ops._attention(q, k, v)[0], attention_ref, [q, k, v])
    probs = cpu_ops._attention(t(q), t(k), t(v))[1].asnumpy()
    np.testing.assert_allclose(probs, softmax_ref(q.astype(np.float64) @ np.swapaxes(k, -1, -2)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lq,lk", [(7, 7), (7, 3)])
def test_chunked_attention_core(lq, lk, monkeypatch):
    monkeypatch.setattr(cpu_ops, "CHUNK", 3)  # three chunks of queries, the last one short
    q, k, v = randn(3, lq, 4), randn(3, lk, 4), randn(3, lk, 4)
    check(cpu_ops._chunked_attention, attention_ref, [q, k, v])


def test_long_keys_take_the_chunked_attention(monkeypatch):
    calls = []
    chunked = cpu_ops._chunked_attention
    monkeypatch.setattr(cpu_ops, "_chunked_attention", lambda q, k, v: calls.append(k.shape[-2]) or chunked(q, k, v))
    attn = make_attention()
    for length in (cpu_ops.CHUNKED_FROM - 1, cpu_ops.CHUNKED_FROM):
        q, k, v = (t(randn(1, 2, length, 4)) for _ in range(3))
        out = attn.math_attention_op(q, k, v).asnumpy()
        np.testing.assert_allclose(out, attention_ref(*(x.asnumpy().astype(np.float64) * s for x, s in
                                                        ((q, attn.scale), (k, 1), (v, 1)))), rtol=1e-4, atol=1e-5)
    assert calls == [cpu_ops.CHUNKED_FROM]


def make_attention():
    from mindone.diffusers.models.attention_processor import Attention

    return Attention(query_dim=8, heads=2, dim_head=4)


def test_mindone_attention_routed_through_substitute():
    from mindone.diffusers.models.attention_processor import Attention

    assert Attention.math_attention_op is cpu_ops.math_attention_op
    assert cpu_ops._MINDONE_MATH_ATTENTION is not None


def test_math_attention_op_four_dim():
    attn = make_attention()
    s = attn.scale_sqrt
    q, k, v = randn(2, 2, 5, 4), randn(2, 2, 7, 4), randn(2, 2, 7, 4)
    check(
        lambda q, k, v: attn.math_attention_op(q, k, v),
        lambda q, k, v: attention_ref(q * s, k * s, v),
        [q, k, v],
    )


def test_math_attention_op_with_mask_falls_back_to_mindone():
    attn = make_attention()
    s = attn.scale_sqrt
    q, k, v = randn(4, 5, 4), randn(4, 6, 4), randn(4, 6, 4)
    mask = np.where(RNG.random((4, 1, 6)) < 0.3, -1e4, 0.0).astype(np.float32)
    out = attn.math_attention_op(t(q), t(k), t(v), t(mask))
    np.testing.assert_allclose(out.asnumpy(), attention_ref(q * s, k * s, v, mask), rtol=1e-4, atol=1e-5)


def test_math_attention_op_half_falls_back_to_mindone():
    attn = make_attention()
    s = attn.scale_sqrt
    q, k, v = randn(2, 5, 4), randn(2, 5, 4), randn(2, 5, 4)
    out = attn.math_attention_op(t(q, ms.float16), t(k, ms.float16), t(v, ms.float16))
    assert out.dtype == ms.float16
    np.testing.assert_allclose(out.asnumpy(), attention_ref(q * s, k * s, v), atol=5e-3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss(reduction):
    x, y = randn(3, 4), randn(3, 4)
    reduce = {"mean": np.mean, "sum": np.sum, "none": lambda a: a}[reduction]
    check(lambda x, y: cpu_ops.mse_loss(x, y, reduction=reduction), lambda x, y: reduce((x - y) ** 2), [x, y])


# ---------------------------------------------------------------- linear algebra and tensor manipulation


@pytest.mark.parametrize("beta,alpha", [(1, 1), (0, 0.5), (0.5, 2.0)])
def test_baddbmm(beta, alpha):
    inp, b1, b2 = randn(2, 3, 1), randn(2, 3, 4), randn(2, 4, 5)
    args = [inp, b1, b2] if beta != 0 else [b1, b2]

    def fn(*a):
        i, x, y = a if beta != 0 else (t(inp), *a)
        return cpu_ops.baddbmm(i, x, y, beta=beta, alpha=alpha)

    def ref(*a):
        i, x, y = a if beta != 0 else (inp, *a)
        return beta * i + alpha * np.matmul(x, y)

    check(fn, ref, args)


def test_baddbmm_beta_zero_ignores_nan_input():
    b1, b2 = randn(1, 2, 3), randn(1, 3, 2)
    out = cpu_ops.baddbmm(t(np.full((1, 2, 2), np.nan)), t(b1), t(b2), beta=0)
    np.testing.assert_allclose(out.asnumpy(), b1 @ b2, rtol=1e-5)


def test_mm():
    """Through mint.mm, as installed; the safety checker's call has a transposed second operand."""
    a, b = randn(3, 4), randn(5, 4)
    check(mint.mm, np.matmul, [a, b.T])
    check(lambda a, b: mint.mm(a, b.t()), lambda a, b: a @ b.T, [a, b])
    out = mint.mm(t(a, ms.float16), t(b.T, ms.float16))
    assert out.dtype == ms.float16
    np.testing.assert_allclose(out.asnumpy(), a @ b.T, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_stack(dim):
    a, b, c = randn(2, 3), randn(2, 3), randn(2, 3)
    check(lambda a, b, c: cpu_ops.stack([a, b, c], dim), lambda a, b, c: np.stack([a, b, c], dim), [a, b, c])
    check(lambda a, b, c: cpu_ops.stack((a, b, c), dim=dim), lambda a, b, c: np.stack([a, b, c], dim), [a, b, c])


def test_outer():
    check(cpu_ops.outer, np.outer, [randn(4), randn(3)])


@pytest.mark.parametrize("dim", [None, 0, 1])
def test_argmax(dim):
    x = randn(4, 5)
    got = cpu_ops.argmax(t(x), dim=dim)
    np.testing.assert_array_equal(got.asnumpy(), np.argmax(x, axis=dim))
    if dim is not None:
        got = cpu_ops.argmax(t(x), dim=dim, keepdim=True)
        np.testing.assert_array_equal(got.asnumpy(), np.argmax(x, axis=dim, keepdims=True))


def test_argmax_ints():
    ids = np.array([[3, 9, 1], [49407, 2, 49407]])
    np.testing.assert_array_equal(cpu_ops.argmax(t(ids, ms.int64), dim=-1).asnumpy(), [1, 0])


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_cumsum(dim):
    check(lambda x: cpu_ops.cumsum(x, dim), lambda x: np.cumsum(x, axis=dim), [randn(3, 4)])


def test_cumsum_dtype():
    out = cpu_ops.cumsum(t([1, 2, 3], ms.int32), 0, dtype=ms.int64)
    assert out.dtype == ms.int64
    np.testing.assert_array_equal(out.asnumpy(), [1, 3, 6])


@pytest.mark.parametrize("dim,keepdim", [(None, False), (1, False), (-1, True), ((0, 2), False), ([1, 2], True)])
def test_norm(dim, keepdim):
    x = randn(2, 3, 4)
    axis = tuple(dim) if isinstance(dim, list) else dim
    check(
        lambda x: cpu_ops.norm(x, 2, dim=dim, keepdim=keepdim),
        lambda x: np.sqrt((x**2).sum(axis=axis, keepdims=keepdim)),
        [x],
    )
    np.testing.assert_allclose(
        cpu_ops.norm(t(x), dim=dim, keepdim=keepdim).asnumpy(),
        np.sqrt((x.astype(np.float64) ** 2).sum(axis=axis, keepdims=keepdim)),
        rtol=1e-5,
    )


def test_norm_rejects_other_orders():
    with pytest.raises(NotImplementedError):
        cpu_ops.norm(t(randn(3)), p=1)


def test_norm_half_accumulates_in_float32():
    x = np.full(4096, 8.0, np.float32)
    out = cpu_ops.norm(t(x, ms.float16))
    assert out.dtype == ms.float16
    np.testing.assert_allclose(out.asnumpy(), 8.0 * 64, rtol=1e-3)


def normalize_ref(x, dim=1, eps=1e-12):
    return x / np.maximum(np.sqrt((x**2).sum(axis=dim, keepdims=True)), eps)


@pytest.mark.parametrize("dim", [1, 0, 2, -1])
def test_normalize(dim):
    x = randn(2, 3, 4)
    check(lambda x: cpu_ops.normalize(x, 2, dim), lambda x: normalize_ref(x, dim), [x])
    check(lambda x: mint.nn.functional.normalize(x, p=2.0, dim=dim), lambda x: normalize_ref(x, dim), [x])


def test_normalize_defaults_and_the_safety_checker_shape():
    """The safety checker's call, through mint as installed: (batch, features) rows to unit length."""
    x = randn(3, 16)
    check(mint.nn.functional.normalize, normalize_ref, [x])
    np.testing.assert_allclose(np.linalg.norm(mint.nn.functional.normalize(t(x)).asnumpy(), axis=1), 1.0, rtol=1e-6)


def test_normalize_eps_clamps_small_norms():
    """Rows with norm below eps are divided by eps, in value and in gradient; a zero row stays zero with gradient
    cot / eps, as in PyTorch, not nan."""
    x = randn(4, 3)
    x[1] *= 0.1 / np.linalg.norm(x[1])
    x[2] = 0.0
    check(lambda x: cpu_ops.normalize(x, eps=0.5), lambda x: normalize_ref(x, eps=0.5), [x])
    x = np.zeros((2, 3), np.float32)
    np.testing.assert_array_equal(cpu_ops.normalize(t(x)).asnumpy(), x)
    cot = randn(2, 3)
    (grad,) = ms_grads(lambda x: cpu_ops.normalize(x, eps=1e-3), [x], cot)
    np.testing.assert_allclose(grad, cot / 1e-3, rtol=1e-5)


def test_normalize_half_and_other_orders():
    x = randn(2, 5)
    out = cpu_ops.normalize(t(x, ms.float16))
    assert out.dtype == ms.float16
    np.testing.assert_allclose(out.asnumpy(), normalize_ref(x.astype(np.float16).astype(np.float64)), atol=2e-3)
    with pytest.raises(NotImplementedError):
        cpu_ops.normalize(t(x), p=1)


ROUND_TIES = {
    # decimals: (float32 inputs that are exact ties once scaled, torch.round's half-to-even results)
    0: ([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5], [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 4.0]),
    3: ([0.0125, 0.0135, 0.0025, 0.1245, -0.0125, -0.0135, -0.0005],
        [0.012, 0.014, 0.002, 0.124, -0.012, -0.014, -0.0]),
    -1: ([15.0, 25.0, -15.0, -25.0, 35.0], [20.0, 20.0, -20.0, -20.0, 40.0]),
}


@pytest.mark.parametrize("decimals", ROUND_TIES)
def test_round(decimals):
    """Half to even like torch.round, and np.round's float32 result bit for bit (the same scale-round-unscale)."""
    ties, want = (np.float32(v) for v in ROUND_TIES[decimals])
    x = np.concatenate([ties, randn(200) * 10.0 ** (1 - decimals)])
    for got in (cpu_ops.round_decimals(t(x), decimals=decimals), mint.round(t(x), decimals=decimals)):
        assert got.dtype == ms.float32
        np.testing.assert_array_equal(got.asnumpy(), np.round(x, decimals))
        np.testing.assert_array_equal(got.asnumpy()[: len(ties)], want)
        np.testing.assert_array_equal(np.signbit(got.asnumpy()), np.signbit(np.round(x, decimals)))


@pytest.mark.parametrize("repeats,dim", [(2, 0), (3, 1), (2, None), ([1, 0, 2], 1)])
def test_repeat_interleave(repeats, dim):
    x = randn(2, 3)
    check(
        lambda x: cpu_ops.repeat_interleave(x, repeats, dim),
        lambda x: np.repeat(x, repeats, axis=dim),
        [x],
    )


def test_clone():
    x = t(randn(2, 3))
    y = x.clone()
    np.testing.assert_array_equal(y.asnumpy(), x.asnumpy())
    before = y.asnumpy().copy()
    x[0] = 100.0
    np.testing.assert_array_equal(y.asnumpy(), before)
    check(lambda x: x.clone() * 2, lambda x: x * 2, [randn(2, 3)])


NONZERO_CASES = {
    "1d": np.array([0.0, 3.0, 0.0, -1.0, 2.0], np.float32),
    "2d-int": np.array([[1, 0, 2], [0, 0, 3]], np.int32),
    "3d-bool": RNG.integers(0, 2, (2, 3, 4)).astype(bool),
    "all-zero": np.zeros((2, 3), np.float32),
    "0d": np.array(2.5, np.float32),
    "0d-zero": np.array(0.0, np.float32),
}


@pytest.mark.parametrize("a", NONZERO_CASES.values(), ids=NONZERO_CASES.keys())
def test_nonzero(a):
    """np.nonzero's index arrays (a 0-d input counts as 1-d, as PyTorch's nonzero does), through Tensor.nonzero and
    mint.nonzero; as_tuple=False: the same indices as one (n, ndim) matrix."""
    dtype = ms.bool_ if a.dtype == bool else ms.int32 if a.dtype == np.int32 else ms.float32
    x = t(a, dtype)
    want = np.nonzero(np.atleast_1d(a))
    for got in (x.nonzero(as_tuple=True), mint.nonzero(x, as_tuple=True)):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == ms.int64
            np.testing.assert_array_equal(g.asnumpy(), w)
    if a.ndim:
        np.testing.assert_array_equal(x.nonzero().asnumpy(), np.stack(want, 1))


# ---------------------------------------------------------------- random


def test_randn_shapes_dtypes_and_statistics():
    assert cpu_ops.randn(2, 3).shape == (2, 3)
    assert cpu_ops.randn((2, 3)).shape == (2, 3)
    assert cpu_ops.randn([4]).shape == (4,)
    assert cpu_ops.randn(2, 3).dtype == ms.float32
    assert cpu_ops.randn(2, dtype=ms.float16).dtype == ms.float16
    x = cpu_ops.randn(200, 200).asnumpy()
    assert abs(x.mean()) < 0.02 and abs(x.std() - 1) < 0.02
    assert abs(np.mean(x**3)) < 0.05 and abs(np.mean(x**4) - 3) < 0.15
    assert not np.array_equal(cpu_ops.randn(8).asnumpy(), cpu_ops.randn(8).asnumpy())


def test_rand_shapes_dtypes_and_statistics():
    assert cpu_ops.rand(2, 3).shape == (2, 3)
    assert cpu_ops.rand((5,)).shape == (5,)
    assert cpu_ops.rand(3, dtype=ms.float16).dtype == ms.float16
    x = cpu_ops.rand(200, 200).asnumpy()
    assert x.dtype == np.float32 and x.min() >= 0 and x.max() < 1
    assert abs(x.mean() - 0.5) < 0.01 and abs(x.var() - 1 / 12) < 0.005
    counts = np.histogram(x, bins=10, range=(0, 1))[0]
    assert counts.min() > 0.9 * x.size / 10


def test_randint_shapes_dtypes_and_statistics():
    x = cpu_ops.randint(3, 10, (4000,))
    assert x.dtype == ms.int64 and x.shape == (4000,)
    v = x.asnumpy()
    assert v.min() == 3 and v.max() == 9
    counts = np.bincount(v - 3)
    assert counts.min() > 0.8 * 4000 / 7
    assert cpu_ops.randint(0, 5, [2, 3], dtype=ms.int32).dtype == ms.int32
    assert cpu_ops.randint(0, 5, [2, 3]).shape == (2, 3)


# ---------------------------------------------------------------- whole model


def test_tiny_unet_forward_backward_finite():
    from mindone.diffusers import UNet2DConditionModel

    ms.set_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    x, ctx, target = t(randn(2, 4, 16, 16)), t(randn(2, 7, 32)), t(randn(2, 4, 16, 16))
    step = t([10, 500], ms.int32)

    def loss_fn(x, ctx):
        pred = unet(x, step, encoder_hidden_states=ctx, return_dict=False)[0]
        return mint.nn.functional.mse_loss(pred, target)

    params = unet.trainable_params()
    loss, grads = ms.value_and_grad(loss_fn, grad_position=None, weights=params)(x, ctx)
    assert np.isfinite(loss.asnumpy()) and loss.asnumpy() > 0
    assert len(grads) == len(params)
    for p, g in zip(params, grads):
        assert g.shape == p.shape
        assert np.isfinite(g.asnumpy()).all(), p.name
    nonzero = sum(bool(np.abs(g.asnumpy()).max() > 0) for g in grads)
    assert nonzero > 0.9 * len(params)
