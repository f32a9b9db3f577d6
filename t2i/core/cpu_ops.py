"""CPU substitutes for the `mindspore.mint` ops that mindone's SD models call but MindSpore's CPU backend lacks (the
same ops in 2.7.1 and 2.10.0).

Installed by `t2i.core.runtime.setup` only when the device target is CPU; on Ascend mindone runs its own ops untouched
(GPU is refused).
Each substitute computes the same function with ops that do have CPU kernels, and is tested against a NumPy reference
(values and gradients) in tests/test_cpu_ops.py. When MindSpore ships the missing kernel, delete the row here and
its test: nothing else depends on it.

| mint op                               | missing CPU kernel        | substitute                                     |
|---------------------------------------|---------------------------|------------------------------------------------|
| mint.nn.Conv2d                        | Conv2DExt                 | im2col (ops.unfold) + batched matmul, BiasAdd  |
| mint.nn.functional.conv2d             | Conv2DExt                 | same                                           |
| mint.nn.functional.pad                | ConstantPadND             | concat with filled blocks (ops.pad if cropping)|
| mint.arange                           | Arange                    | ops.arange                                     |
| mint.nn.LayerNorm, functional.layer_norm | LayerNormExt           | legacy LayerNorm primitive (P.LayerNorm), fp32 |
| mint.nn.GELU, functional.gelu         | GeluExt                   | x * (erf(x/sqrt2) + 1) / 2; tanh: ops.gelu     |
| mint.nn.functional.mse_loss           | MSELossExt                | squared difference, reduced                    |
| mint.baddbmm                          | Baddbmm                   | beta * input + alpha * bmm                     |
| mint.linspace                         | LinSpaceExt               | ops.linspace                                   |
| mint.full                             | FillScalar                | ops.fill                                       |
| mint.stack                            | StackExt                  | ops.stack                                      |
| mint.outer                            | Outer                     | broadcast multiply                             |
| mint.ones_like, mint.zeros_like       | OnesLikeExt, ZerosLikeExt | ops.ones_like, ops.zeros_like                  |
| mint.randn, mint.rand, mint.randint   | InplaceNormal/Uniform/... | ops.standard_normal, ops.uniform, ops.randint  |
| mint.argmax                           | ArgMaxExt                 | ops.argmax                                     |
| mint.cumsum                           | CumsumExt                 | ops.cumsum                                     |
| mint.norm                             | LinalgVectorNorm          | sqrt of sum of squares (p=2)                   |
| mint.nn.functional.normalize          | LinalgVectorNorm          | x / sqrt(max(sum of squares, eps**2)) (p=2)    |
| mint.mm                               | Mm                        | MatMul primitive                               |
| mint.round                            | Round: decimals=0 only    | Round of x * 10**decimals, scaled back         |
| mint.repeat_interleave                | RepeatInterleaveInt       | ops.repeat_interleave                          |
| Tensor.clone                          | Clone                     | Tensor.copy                                    |
| mint.nn.Dropout, functional.dropout   | DropoutExt                | ops.dropout (mindone.peft's --lora_dropout)    |
| Tensor.nonzero, mint.nonzero          | NonZeroExt (as_tuple=True)| columns of NonZero's (n, ndim) index matrix    |

Tensor.nonzero(as_tuple=True) is how mindone's DDPMScheduler (also LCM, TCD) finds the previous timestep in `step`.
normalize, mm and round(decimals=3) are what mindone's StableDiffusionSafetyChecker calls to score an image.

The rows below have kernels; they are substituted because the CPU kernels, or the backward MindSpore derives for
them, are slow. Times are on this project's 2-core CPU box, min over interleaved repeats, forward+backward.

| op                                  | slow part                           | substitute, measured gain          |
|-------------------------------------|-------------------------------------|------------------------------------|
| mint.softmax                        | its backward subtracts (..., 1) row | hand-written backward; row sums    |
|                                     | sums from (..., n): broadcasting    | spread by matmuls. (16,1024,1024): |
|                                     | kernels are ~10x slower than        | 380 -> 52 ms; tiny UNet step       |
|                                     | same-shape ones                     | 1645 -> 1110 ms                    |
| mindone Attention.math_attention_op | autodiff of bmm-softmax-bmm keeps   | `_Attention`: one cell with a      |
| (CPU path of its SDPA), float32 and | and re-reads several (B, L, L)      | flash-attention style backward;    |
| unmasked calls only                 | tensors                             | core (16,1024,4): 226 -> 86 ms;    |
|                                     |                                     | UNet step 1225 -> 753 ms           |
| mint.nn.Linear, functional.linear   | Dense on (..., in) inputs           | 2-D MatMul(transpose_b) + BiasAdd; |
|                                     |                                     | (2,1024,32)x(256,32): 12.9 -> 10.5 |

These rows make the UNet compile with ms.jit (train's --jit) on CPU; PyNative needs neither.

| op                                  | in an ms.jit graph on CPU           | substitute                         |
|-------------------------------------|-------------------------------------|------------------------------------|
| mindone GEGLU.construct             | Tensor.chunk: no Chunk kernel       | two slices of the projection       |
| mint.nn.GroupNorm (and the conv and | fp16 activations meet fp32 weights  | group_norm in float32; conv/linear |
| linear substitutes) under amp O2    | (PyNative promotes, graphs reject)  | cast weights to the input dtype    |

Only where t2i.core.compat finds them missing (MindSpore 2.7.x; 2.8.0-2.10.0 compile them), MINT_GRAPH:

| op                                  | in an ms.jit graph on CPU           | substitute                         |
|-------------------------------------|-------------------------------------|------------------------------------|
| mint.split (mindone's timestep      | SplitWithSize, SplitTensor: no CPU  | ops.split (Split/SplitV kernels)   |
| embedding), mint.chunk, mint.narrow | kernel; Chunk, Narrow: none either  | ops.chunk; slicing                 |

Within the substitutes: the conv's weight is broadcast to the batch explicitly and multiplied with bmm (mint.matmul's
implicit broadcast: 10.0 vs 5.4 ms for a 2x32x32x32 3x3 conv); biases go through BiasAdd (0.09 ms vs 0.40 ms for a
broadcast add). MindSpore's own CPU Conv2D (ops.conv2d) is no alternative: ~75 ms vs ~3 ms forward for that conv.
"""

import sys
import types

import mindspore as ms
from mindspore import mint, nn, ops
from mindspore.ops import operations as P

_installed = False


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _like(input, param):
    """A parameter in the input's dtype: under fp16 autocast (amp O2) the fp32 master weights meet fp16
    activations, which PyNative's kernels promote and ms.jit graphs reject."""
    return param if param is None or param.dtype == input.dtype else param.astype(input.dtype)


# An im2col buffer larger than this is built a band of output rows at a time: whole, the VAE's convolutions at 512 px
# unfold up to 256 channels x 9 taps x 512x512 positions, 2.4 GB each (t2i-infer at 512 px peaked at 15.5 GB).
IM2COL_BYTES = 256 * 2**20


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D cross-correlation as im2col + one batched matmul (NCHW, OIHW weights); 1x1 convs skip the im2col, and an
    im2col above IM2COL_BYTES is made and multiplied a band of output rows at a time."""
    n, c, h, w = input.shape
    o, cg, kh, kw = weight.shape
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        elif padding == "same":
            padding = ((dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2)
        else:
            raise ValueError(f"conv2d: unsupported padding {padding!r}")
    ph, pw = _pair(padding)
    weight, bias = _like(input, weight), _like(input, bias)
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if groups != 1:
        outs = [
            conv2d(xi, wi, None, stride, padding, dilation, 1)
            for xi, wi in zip(ops.split(input, c // groups, 1), ops.split(weight, o // groups, 0))
        ]
        out = ops.cat(outs, 1)
    else:
        # An explicit per-sample copy of the weight and a batched matmul: mint.matmul's implicit broadcast of a
        # 2-D weight over the batch is ~2x slower forward+backward on CPU.
        weights = ops.broadcast_to(weight.reshape(1, o, cg * kh * kw), (n, o, cg * kh * kw))
        if kh == 1 and kw == 1 and sh == 1 and sw == 1 and ph == 0 and pw == 0:
            out = ops.bmm(weights, input.reshape(n, c, h * w)).reshape(n, o, ho, wo)
        else:
            row_bytes = n * c * kh * kw * wo * 4  # float32: fp16 activations just get bands half as full
            rows = max(1, IM2COL_BYTES // row_bytes)
            if rows >= ho:
                cols = ops.unfold(input, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
                out = ops.bmm(weights, cols).reshape(n, o, ho, wo)
            else:
                # `rows` output rows at a time from the padded input's band of rows they read.
                padded = pad(input, (pw, pw, ph, ph)) if ph or pw else input
                bands = []
                for r in range(0, ho, rows):
                    end = min(ho, r + rows)
                    band = padded[:, :, r * sh : (end - 1) * sh + dh * (kh - 1) + 1]
                    cols = ops.unfold(band, (kh, kw), dilation=(dh, dw), padding=0, stride=(sh, sw))
                    bands.append(ops.bmm(weights, cols).reshape(n, o, end - r, wo))
                out = ops.cat(bands, 2)
    if bias is not None:
        out = ops.bias_add(out, bias)
    return out


class Conv2d(mint.nn.Conv2d):
    """mint.nn.Conv2d with the same parameters, computed by `conv2d` above."""

    def construct(self, input):
        if self.padding_mode != "zeros":
            pad = (self.padding[1], self.padding[1], self.padding[0], self.padding[0])
            input = ops.pad(input, pad, mode=self.padding_mode)
            return conv2d(input, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


_matmul_nt = P.MatMul(transpose_b=True)


def linear(input, weight, bias=None):
    """x W^T + b as one 2-D MatMul (transpose_b) and BiasAdd, whatever the leading dims of x."""
    weight, bias = _like(input, weight), _like(input, bias)
    out = _matmul_nt(input.reshape(-1, input.shape[-1]), weight)
    if bias is not None:
        out = ops.bias_add(out, bias)
    return out.reshape(input.shape[:-1] + (weight.shape[0],))


class Linear(mint.nn.Linear):
    def construct(self, input):
        return linear(input, self.weight, self.bias)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """The legacy LayerNorm primitive, which has CPU kernels for forward and backward; computed in float32."""
    normalized_shape = tuple(normalized_shape)
    axis = input.ndim - len(normalized_shape)  # the primitive rejects negative axes below -1
    weight = ops.ones(normalized_shape, ms.float32) if weight is None else weight.float()
    bias = ops.zeros(normalized_shape, ms.float32) if bias is None else bias.float()
    out = P.LayerNorm(axis, axis, eps)(input.float(), weight, bias)[0]
    return out.to(input.dtype)


class LayerNorm(mint.nn.LayerNorm):
    def construct(self, input):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


def gelu(input, approximate="none"):
    if approximate == "tanh":
        return ops.gelu(input, approximate="tanh")
    # ops.gelu's erf branch divides by and adds 0-d tensors, which takes MindSpore's slow broadcasting kernels;
    # multiplying by Python floats stays on the fast elementwise path.
    return input * (ops.erf(input * 0.7071067811865476) * 0.5 + 0.5)


def geglu_construct(self, hidden_states):
    """mindone GEGLU.construct without Tensor.chunk, which has no CPU kernel in ms.jit graphs (train's --jit)."""
    hidden_states = self.proj(hidden_states)
    half = hidden_states.shape[-1] // 2
    return hidden_states[..., :half] * self.gelu(hidden_states[..., half:])


class GroupNorm(mint.nn.GroupNorm):
    def construct(self, input):
        out = ops.group_norm(input.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.to(input.dtype)


class GELU(mint.nn.GELU):
    def construct(self, input):
        return gelu(input, self.approximate)


class _LastDimSoftmax(nn.Cell):
    """Softmax over the last axis with a hand-written backward, dx = y*dy - y*rowsum(y*dy).

    Autodiff of Softmax subtracts the (..., 1) row sums from the (..., n) gradient, and MindSpore's CPU
    broadcasting kernels are ~10x slower than same-shape ones. Spreading the row sums to (..., n) with a matmul
    against ones keeps every elementwise op same-shape."""

    def construct(self, x):
        return ops.softmax(x, -1)

    def bprop(self, x, out, dout):
        n = out.shape[-1]
        y_dy = out * dout
        row_sums = mint.matmul(mint.matmul(y_dy, ops.ones((n, 1), out.dtype)), ops.ones((1, n), out.dtype))
        return (y_dy - out * row_sums,)


_last_dim_softmax = _LastDimSoftmax()


def softmax(input, dim, *, dtype=None):
    if dtype is not None:
        input = input.to(dtype)
    if input.ndim == 0 or dim not in (-1, input.ndim - 1):
        return ops.softmax(input, dim)
    return _last_dim_softmax(input)


_bmm_nt = P.BatchMatMul(transpose_b=True)
_bmm_tn = P.BatchMatMul(transpose_a=True)
_bmm_tt = P.BatchMatMul(transpose_a=True, transpose_b=True)


class _Attention(nn.Cell):
    """(softmax(q k^T) v, softmax(q k^T)) for (batch, length, dim) float32 inputs, with a hand-written backward.

    Returns the probabilities as a second output so the backward reuses them instead of keeping autodiff's
    own copies. The backward folds the softmax row sums into the dP matmul, using rowsum(P * dP) = rowsum(dO * O):
    dS = P * ([dO, -rowsum(dO*O)] @ [V, 1]^T), so no (batch, L, L) broadcast or extra pass is needed.
    Products with a (L, L) operand are computed transposed, as (dim, L) results: the CPU BatchMatMul kernel is
    ~1.5-2x faster producing a few long rows than many length-`dim` rows (e.g. P @ V for (16,1024,4): 9.7 ms,
    (V^T P^T)^T: 6.6 ms)."""

    def construct(self, q, k, v):
        probs = ops.softmax(_bmm_nt(q, k), -1)
        return _bmm_tt(v, probs).swapaxes(-1, -2), probs

    def bprop(self, q, k, v, out, dout):
        o, probs = out
        do = dout[0]
        row = (do * o).sum(-1, keepdims=True)
        ones = ops.ones(v.shape[:-1] + (1,), v.dtype)
        ds = probs * _bmm_nt(ops.cat([do, -row], -1), ops.cat([v, ones], -1))
        dq = _bmm_tt(k, ds).swapaxes(-1, -2)
        dk = _bmm_tn(q, ds).swapaxes(-1, -2)
        dv = _bmm_tn(do, probs).swapaxes(-1, -2)
        return dq, dk, dv


_attention = _Attention()

# Keys from this length on go through _ChunkedAttention, CHUNK queries at a time. SD-1.5 at 512 px has 4096-token
# self-attention: one (8 heads, 4096, 4096) float32 matrix is 512 MB, and _Attention's backward holds several.
CHUNKED_FROM = 2048
CHUNK = 1024


class _ChunkedAttention(nn.Cell):
    """softmax(q k^T) v for long sequences, CHUNK queries at a time, as flash attention does it: neither pass holds a
    whole (batch, L, L) matrix, and the backward recomputes each chunk's probabilities (one more q k^T and softmax per
    chunk) instead of keeping them. Same gradient formulas as _Attention's, chunk by chunk."""

    def construct(self, q, k, v):
        return ops.cat([_bmm_tt(v, ops.softmax(_bmm_nt(q[:, i:i + CHUNK], k), -1)).swapaxes(-1, -2)
                        for i in range(0, q.shape[1], CHUNK)], 1)

    def bprop(self, q, k, v, out, dout):
        ones = ops.ones(v.shape[:-1] + (1,), v.dtype)
        v_ones = ops.cat([v, ones], -1)
        dq, dk, dv = [], ops.zeros_like(k), ops.zeros_like(v)
        for i in range(0, q.shape[1], CHUNK):
            qi, doi = q[:, i:i + CHUNK], dout[:, i:i + CHUNK]
            probs = ops.softmax(_bmm_nt(qi, k), -1)
            row = (doi * out[:, i:i + CHUNK]).sum(-1, keepdims=True)
            ds = probs * _bmm_nt(ops.cat([doi, -row], -1), v_ones)
            dq.append(_bmm_tt(k, ds).swapaxes(-1, -2))
            dk = dk + _bmm_tn(qi, ds).swapaxes(-1, -2)
            dv = dv + _bmm_tn(doi, probs).swapaxes(-1, -2)
        return ops.cat(dq, 1), dk, dv


_chunked_attention = _ChunkedAttention()
_MINDONE_MATH_ATTENTION = None  # set by install(): the method math_attention_op replaces, for the calls it declines


def math_attention_op(self, query, key, value, attn_mask=None):
    """mindone `Attention.math_attention_op` (the CPU path of its scaled_dot_product_attention) through
    `_Attention` (`_ChunkedAttention` for long keys); masked or non-float32 calls keep mindone's own implementation."""
    if attn_mask is not None or not query.dtype == key.dtype == value.dtype == ms.float32:
        return _MINDONE_MATH_ATTENTION(self, query, key, value, attn_mask)
    out_shape = query.shape[:-1] + (value.shape[-1],)
    q = query.reshape(-1, *query.shape[-2:]) * self.scale_sqrt
    k = key.reshape(-1, *key.shape[-2:]) * self.scale_sqrt
    v = value.reshape(-1, *value.shape[-2:])
    out = _chunked_attention(q, k, v) if k.shape[-2] >= CHUNKED_FROM else _attention(q, k, v)[0]
    return out.reshape(out_shape)


def dropout(input, p=0.5, training=True, inplace=False):
    return ops.dropout(input, p=p, training=True) if training and p > 0 else input


class Dropout(nn.Cell):
    def __init__(self, p=0.5, inplace=False):
        super().__init__()
        self.p = p

    def construct(self, input):
        return dropout(input, self.p, self.training)


def mse_loss(input, target, reduction="mean"):
    sq = (input - target) ** 2
    if reduction == "mean":
        return sq.mean()
    if reduction == "sum":
        return sq.sum()
    return sq


def pad(input, pad, mode="constant", value=None):
    pad = tuple(pad)
    if mode != "constant":
        return ops.pad(input, pad, mode=mode)
    value = 0.0 if value is None else value
    if min(pad) < 0:
        return ops.pad(input, pad, mode="constant", value=value)
    # Constant padding as concatenation with filled blocks: the CPU PadV3 kernel behind ops.pad takes ~10 ms for
    # the VAE's (0, 1, 0, 1) pad of an 8x32x64x64 batch, the concatenation ~0.7 ms.
    out = input
    for i in range(len(pad) // 2):
        dim = input.ndim - 1 - i
        before, after = pad[2 * i], pad[2 * i + 1]
        # No list.insert: in an ms.jit graph it made `out` a constant, so no gradient reached the input.
        if before:
            out = ops.cat((ops.full(out.shape[:dim] + (before,) + out.shape[dim + 1 :], value, dtype=out.dtype), out),
                          dim)
        if after:
            out = ops.cat((out, ops.full(out.shape[:dim] + (after,) + out.shape[dim + 1 :], value, dtype=out.dtype)),
                          dim)
    return out


def arange(start=0, end=None, step=1, *, dtype=None):
    return ops.arange(start, end, step, dtype=dtype)


def baddbmm(input, batch1, batch2, *, beta=1, alpha=1):
    out = ops.bmm(batch1, batch2)
    if alpha != 1:
        out = out * alpha
    if beta == 0:
        return out
    return out + input * beta


_matmul = P.MatMul()


def mm(input, mat2):
    return _matmul(input, mat2)


def linspace(start, end, steps, *, dtype=None):
    out = ops.linspace(ms.Tensor(start, ms.float32), ms.Tensor(end, ms.float32), steps)
    return out if dtype is None else out.to(dtype)


def full(size, fill_value, *, dtype=None):
    if dtype is None:
        dtype = ms.float32 if isinstance(fill_value, float) else ms.int64
    return ops.fill(dtype, tuple(size), fill_value)


def stack(tensors, dim=0):
    return ops.stack(tuple(tensors), dim)


def outer(input, vec2):
    return input.reshape(-1, 1) * vec2.reshape(1, -1)


def ones_like(input, *, dtype=None):
    return ops.ones_like(input, dtype=dtype)


def zeros_like(input, *, dtype=None):
    return ops.zeros_like(input, dtype=dtype)


def _size(size):
    return tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else tuple(size)


def randn(*size, generator=None, dtype=None):
    return ops.standard_normal(_size(size)).to(dtype or ms.float32)


def rand(*size, generator=None, dtype=None):
    return ops.uniform(_size(size), ms.Tensor(0.0), ms.Tensor(1.0)).to(dtype or ms.float32)


def randint(low, high, size, *, generator=None, dtype=None):
    return ops.randint(low, high, tuple(size), dtype=dtype or ms.int64)


def argmax(input, dim=None, keepdim=False):
    return ops.argmax(input, dim=dim, keepdim=keepdim)


def cumsum(input, dim, *, dtype=None):
    out = ops.cumsum(input, dim)
    return out if dtype is None else out.to(dtype)


def norm(input, p="fro", dim=None, keepdim=False, *, dtype=None):
    if p not in ("fro", 2, 2.0):
        raise NotImplementedError(f"t2i CPU norm: only p=2, got {p}")
    axis = dim if dim is None or isinstance(dim, int) else tuple(dim)
    out = ops.sqrt((input.float() ** 2).sum(axis=axis, keepdims=keepdim))
    return out.to(dtype or input.dtype)


def normalize(input, p=2.0, dim=1, eps=1e-12):
    """input / max(2-norm along dim, eps). Clamping the sum of squares at eps**2 before the sqrt gives the same value
    and, for an all-zero vector, PyTorch's gradient (1/eps): through `norm`, sqrt's gradient at 0 would make it nan."""
    if p not in (2, 2.0):
        raise NotImplementedError(f"t2i CPU normalize: only p=2, got {p}")
    axis = dim if isinstance(dim, int) else tuple(dim)
    sum_sq = (input.float() ** 2).sum(axis=axis, keepdims=True)
    return input / ops.sqrt(sum_sq.clamp(min=eps * eps)).to(input.dtype)


def round_decimals(input, *, decimals=0):
    """Half to even at `decimals` places, computed as torch.round and np.round do: Round (half to even, decimals=0)
    of input * 10**decimals, divided back; a negative `decimals` divides first so the scale stays an exact integer."""
    if decimals == 0:
        return ops.round(input)
    scale = 10.0 ** abs(decimals)
    if decimals > 0:
        return ops.round(input * scale) / scale
    return ops.round(input / scale) * scale


def repeat_interleave(input, repeats, dim=None, *, output_size=None):
    return ops.repeat_interleave(input, repeats, dim)


def _clone(self):
    return self.copy()


_non_zero = P.NonZero()


def nonzero(input, *, as_tuple=False):
    """as_tuple=True as the columns of NonZero's (n, ndim) index matrix; a 0-d input counts as 1-d, as in PyTorch."""
    if not as_tuple:
        return _non_zero(input)
    indices = _non_zero(input.reshape(1) if input.ndim == 0 else input)
    return tuple(indices[:, i] for i in range(indices.shape[1]))


def _tensor_nonzero(self, *, as_tuple=False):
    return nonzero(self, as_tuple=as_tuple)


def split(tensor, split_size_or_sections, dim=0):
    """mint.split through ops.split (Split/SplitV primitives), which compile in an ms.jit graph on CPU."""
    if not isinstance(split_size_or_sections, int):
        split_size_or_sections = tuple(split_size_or_sections)
    return ops.split(tensor, split_size_or_sections, dim)


def chunk(input, chunks, dim=0):
    return ops.chunk(input, chunks, dim)


def narrow(input, dim, start, length):
    dim = dim % input.ndim
    start = start % input.shape[dim] if start < 0 else start
    return input[(slice(None),) * dim + (slice(start, start + length),)]


MINT = {
    "arange": arange,
    "baddbmm": baddbmm,
    "linspace": linspace,
    "full": full,
    "stack": stack,
    "outer": outer,
    "ones_like": ones_like,
    "zeros_like": zeros_like,
    "randn": randn,
    "rand": rand,
    "randint": randint,
    "argmax": argmax,
    "cumsum": cumsum,
    "norm": norm,
    "mm": mm,
    "round": round_decimals,
    "repeat_interleave": repeat_interleave,
    "softmax": softmax,
    "nonzero": nonzero,
}
# Installed only where t2i.core.compat.cpu_graph_ops_missing() names them (MindSpore 2.7.x): no CPU kernel in a graph.
MINT_GRAPH = {"split": split, "chunk": chunk, "narrow": narrow}
MINT_NN = {"Conv2d": Conv2d, "LayerNorm": LayerNorm, "GELU": GELU, "Linear": Linear, "GroupNorm": GroupNorm,
           "Dropout": Dropout}
MINT_F = {
    "linear": linear,
    "conv2d": conv2d,
    "pad": pad,
    "layer_norm": layer_norm,
    "gelu": gelu,
    "mse_loss": mse_loss,
    "normalize": normalize,
    "dropout": dropout,
}


def _bind_own_name(cls, name):
    """cls.__init__ with `name` bound to cls itself rather than looked up in its module, where install puts the
    substitute (a subclass: its __init__ reaching cls.__init__ would then recurse through super(name, self))."""
    init = cls.__init__
    fixed = types.FunctionType(init.__code__, {**init.__globals__, name: cls}, init.__name__, init.__defaults__,
                               init.__closure__)
    fixed.__kwdefaults__ = init.__kwdefaults__
    cls.__init__ = fixed


def install():
    """Route the missing ops to the substitutes, in `mint` and in every loaded mindone module that kept a reference."""
    global _installed, _MINDONE_MATH_ATTENTION
    if _installed:
        return
    from t2i.core import compat

    # Asked before anything is replaced: the probe compiles the mint ops themselves.
    graph_ops = {name: MINT_GRAPH[name] for name in compat.cpu_graph_ops_missing()}
    for name in compat.mint_nn_inits_naming_themselves(tuple(MINT_NN)):
        _bind_own_name(getattr(mint.nn, name), name)
    originals = {}
    for namespace, table in ((mint, {**MINT, **graph_ops}), (mint.nn, MINT_NN), (mint.nn.functional, MINT_F)):
        for name, substitute in table.items():
            original = getattr(namespace, name)
            originals[id(original)] = (original, substitute)
            setattr(namespace, name, substitute)
    ms.Tensor.clone = _clone
    ms.Tensor.nonzero = _tensor_nonzero
    from mindone.diffusers.models.attention_processor import Attention

    _MINDONE_MATH_ATTENTION = Attention.math_attention_op
    Attention.math_attention_op = math_attention_op
    from mindone.diffusers.models.activations import GEGLU

    GEGLU.construct = geglu_construct
    import mindone.diffusers.models.layers_compat  # noqa: F401  (binds mint ops at import; swept below)

    for mod_name, module in list(sys.modules.items()):
        if not mod_name.startswith("mindone") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            pair = originals.get(id(value))
            if pair is not None and pair[0] is value:
                setattr(module, attr, pair[1])
    _installed = True
