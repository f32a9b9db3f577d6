"""The optimizer: AdamW with torch.optim.AdamW's update, through MindSpore's fused in-place AdamWeightDecay kernel.

mindspore.nn.AdamWeightDecay (what mindone's create_optimizer calls "adamw") has no bias correction, so its first step
moves every weight by (1 - beta1) / sqrt(1 - beta2) * lr = 3.16 * lr where torch moves it by lr. mindone's
adamw_mint.AdamW and mindspore.mint.optim.AdamW call the fused AdamW kernel, which MindSpore's CPU backend lacks
("kernel ZerosLikeExt / AdamW unregistered"); mindspore.experimental.optim.AdamW takes a float lr driven by its own
LRScheduler classes (no per-step list, no global_step); mindcv's AdamW has torch's update but spells it out in a dozen
ops per parameter, whose SD-1.5-sized temporaries (3.4 GB each) took the optimizer step past 19.5 GB of RSS.

The AdamWeightDecay kernel (Ascend, GPU and CPU) updates w, m, v in place with
m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  w -= lr' (m / (sqrt(v) + eps') + wd' w),
which is torch's w *= 1 - lr wd;  w -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps) with bc_i = 1 - b_i^t when
lr' = lr sqrt(bc2) / bc1,  eps' = eps sqrt(bc2),  wd' = wd bc1 / sqrt(bc2)  (so lr' wd' = lr wd).
State is Parameters: adam_m.*, adam_v.*, beta1_power, beta2_power (beta^t, i.e. the step count) and global_step, so
saving and restoring the optimizer's Parameters by name resumes it exactly.
"""


# The parameters are updated in chunks of about this many bytes, one after the other (see AdamW.compiled).
CHUNK_BYTES = 256 * 2**20


def _chunks(sizes, limit) -> tuple:
    """(start, end) index ranges of consecutive items whose sizes add up to at most `limit` (or one item)."""
    ranges, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            ranges.append((start, i))
            start, total = i, 0
        total += size
    return tuple(ranges + [(start, len(sizes))])


def zeros_like(params, prefix):
    """Zero Parameters named `prefix.<name>`, shaped as `params`, allocated on first use: what
    ParameterTuple.clone(prefix, init="zeros") makes, without the copy of each parameter's data it takes first
    (copy.copy of a Parameter holding loaded weights copies them; SD-1.5: +3.3 GB of RSS that stayed)."""
    import mindspore as ms
    from mindspore.common.initializer import initializer

    return ms.ParameterTuple(ms.Parameter(initializer("zeros", p.shape, p.dtype), name=f"{prefix}.{p.name}")
                             for p in params)


def build_adamw(params, learning_rate, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, jit=True):
    """AdamW over `params` with torch.optim.AdamW's update; learning_rate is a float or a per-step list (optimizer
    step s, counted by `global_step`, uses learning_rate[s]). Every parameter is decayed, as torch does.

    Called as optimizer(grads, grad_scale): each gradient is multiplied by the scalar grad_scale inside its own
    update, so unscaling and clipping never hold a second copy of all the gradients.

    jit: the update runs as one compiled graph (~2 PyNative ops per parameter saved). Fed gradients computed op by op
    (t2i-train --no_jit), the graph keeps memory the size of all gradients from its first call on (measured: 12 x
    2048^2 weights, +190 MB over weights + gradients + moments; SD-1.5, ~3 GB), so op-by-op training updates op by op,
    one parameter after the other, dropping each update's output at once: held to the end of the step (as the graph's
    results are, or by a HyperMap) they took the pool +0.34 GB at half SD-1.5 width, +1.5 GB at SD-1.5 size."""
    import mindspore as ms
    from mindspore import nn, ops
    from mindspore.common.initializer import initializer

    update = ops.MultitypeFuncGraph("adamw_update")
    fused = ops.AdamWeightDecay()

    @update.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                     "Tensor")
    def _(lr, b1, b2, eps, decay, grad_scale, param, m, v, grad):
        return fused(param, m, v, lr, b1, b2, eps, decay, grad * ops.cast(grad_scale, grad.dtype))[0]

    class AdamW(nn.Optimizer):
        def __init__(self):
            # nn.Optimizer's own weight decay is off: it is folded into the kernel's decay below.
            super().__init__(learning_rate, params, 0.0)
            self.beta1, self.beta2 = ms.Tensor(beta1, ms.float32), ms.Tensor(beta2, ms.float32)
            self.eps, self.decay = ms.Tensor(eps, ms.float32), ms.Tensor(weight_decay, ms.float32)
            self.moments1 = zeros_like(self.parameters, "adam_m")
            self.moments2 = zeros_like(self.parameters, "adam_v")
            self.beta1_power = ms.Parameter(initializer(1, [1], ms.float32), name="beta1_power")
            self.beta2_power = ms.Parameter(initializer(1, [1], ms.float32), name="beta2_power")
            self.chunks = _chunks([p.nbytes for p in self.parameters], CHUNK_BYTES)

        def coefficients(self):
            """Count the step; (the kernel's lr', eps', wd') for it."""
            lr = self.get_lr()
            ops.assign_add(self.global_step, self.global_step_increase_tensor)
            beta1_power = self.beta1_power * self.beta1
            ops.assign(self.beta1_power, beta1_power)
            beta2_power = self.beta2_power * self.beta2
            ops.assign(self.beta2_power, beta2_power)
            bc1 = (1 - beta1_power).reshape(())
            sqrt_bc2 = ops.sqrt(1 - beta2_power).reshape(())
            return lr * sqrt_bc2 / bc1, self.eps * sqrt_bc2, self.decay * bc1 / sqrt_bc2

        @ms.jit
        def compiled(self, gradients, grad_scale):
            step_lr, eps, decay = self.coefficients()
            results = ()
            for start, end in self.chunks:
                # Each chunk's grad * grad_scale waits for the previous chunk's updates: left to itself the graph
                # computes all of them first, a second copy of every gradient (+3.4 GB at SD-1.5 size).
                grad_scale = ops.depend(grad_scale, results)
                results += self.hyper_map(
                    ops.partial(update, step_lr, self.beta1, self.beta2, eps, decay, grad_scale),
                    self.parameters[start:end], self.moments1[start:end], self.moments2[start:end],
                    gradients[start:end])
            # Only the updates' order and side effects are needed: returning the updated parameters makes the graph
            # hand back a copy of every one of them.
            return ops.depend(self.global_step, results)

        def op_by_op(self, gradients, grad_scale):
            step_lr, eps, decay = self.coefficients()
            for param, m, v, grad in zip(self.parameters, self.moments1, self.moments2, gradients):
                update(step_lr, self.beta1, self.beta2, eps, decay, grad_scale, param, m, v, grad)
            return self.global_step

        def construct(self, gradients, grad_scale=1.0):
            grad_scale = ms.Tensor(grad_scale, ms.float32) if isinstance(grad_scale, float) else grad_scale
            return self.compiled(gradients, grad_scale) if jit else self.op_by_op(gradients, grad_scale)

    return AdamW()
