"""The device side of one optimizer step: mindone's TrainStep with the UNet's forward+backward compiled, and the
per-parameter work around it (unscale, global-norm clip, EMA) compiled into one graph each."""

import functools
import types


@functools.cache
def _fused() -> types.SimpleNamespace:
    """Per-parameter updates compiled into one graph each (ms.jit over a HyperMap).

    In PyNative every op costs ~40-80 us of dispatch on CPU whatever its size, and mindone's GradClipper
    (clip_by_global_norm), a grad norm, the loss scaler's unscale and EMAModel.step each issue one to four ops per
    parameter. Measured on the tiny UNet (208 parameters, 2-core CPU): grad norm + clip 140-250 -> 4.4 ms, EMA 50-77
    -> 9 ms per optimizer step; compiling takes ~0.5 s once per process."""
    import mindspore as ms
    from mindspore import nn, ops

    hyper_map = ops.HyperMap()
    square_sum = ops.MultitypeFuncGraph("square_sum")
    ema_pull = ops.MultitypeFuncGraph("ema_pull")

    @square_sum.register("Tensor")
    def _(g):
        g = ops.cast(g, ms.float32)
        return (g * g).sum()

    @ema_pull.register("Tensor", "Tensor", "Tensor")
    def _(weight, shadow, param):
        return ops.assign_sub(shadow, (shadow - param) * ops.cast(weight, shadow.dtype))

    def clip(grads, max_norm, loss_scale):
        norm = ops.sqrt(ops.addn(hyper_map(square_sum, grads))) / loss_scale
        return norm, max_norm / ops.maximum(norm, max_norm) / loss_scale

    compiled_clip = ms.jit(clip)

    def clip_grad_norm(grads, max_norm, loss_scale, jit=True):
        """(global norm of the unscaled grads, the factor that unscales and clips them): mindspore's
        clip_by_global_norm rule, grads / loss_scale * max_norm / max(norm, max_norm), left to the optimizer to
        apply to each gradient in its own update (at SD-1.5 size a clipped copy of all gradients is 3.4 GB).
        mutable: a plain tuple of tensors is a compile-time constant to ms.jit, recompiled for every new one.
        jit=False for gradients computed op by op, as t2i.training.optim.build_adamw's jit says."""
        if not jit:
            return clip(tuple(grads), max_norm, loss_scale)
        return compiled_clip(ms.mutable(tuple(grads)), max_norm, loss_scale)

    class EMAUpdate(nn.Cell):
        """shadow -= (1 - decay) * (shadow - param) for every pair; Parameters held as attributes so the graph
        updates them in place."""

        def __init__(self, shadows, params):
            super().__init__(auto_prefix=False)
            self.shadows, self.params = ms.ParameterTuple(shadows), ms.ParameterTuple(params)

        @ms.jit
        def construct(self, weight):
            return hyper_map(ops.partial(ema_pull, weight), self.shadows, self.params)

    return types.SimpleNamespace(clip_grad_norm=clip_grad_norm, EMAUpdate=EMAUpdate)


def build_ema(params, **kwargs):
    """mindone's EMAModel(params, **kwargs) whose step is one compiled update (mindone's own `foreach` fast path is
    NotImplemented)."""
    import mindspore as ms
    from mindone.diffusers.training_utils import EMAModel

    class ForeachEMA(EMAModel):
        _update, _update_for = None, None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for shadow in self.shadow_params:  # clones keep the weights' names; one graph needs unique ones
                shadow.name = "ema." + shadow.name

        def step(self, parameters):
            parameters = list(parameters)
            self.optimization_step += 1
            self.cur_decay_value = decay = self.get_decay(self.optimization_step)
            key = tuple(map(id, self.shadow_params + parameters))
            if self._update_for != key:
                self._update, self._update_for = _fused().EMAUpdate(self.shadow_params, parameters), key
            self._update(ms.Tensor(1 - decay, ms.float32))

    return ForeachEMA(params, **kwargs)


def mixed_precision(unet, compute, lora=False):
    """(the cell the train step runs, its loss scaler) for compute dtype `compute`: in half precision mindspore.amp's
    O2, so the UNet computes in half while its fp32 parameters stay the optimizer's master weights; with a LoRA the
    frozen base itself is stored in half (t2i.interop.lora.cast_frozen). fp16 gets a dynamic loss scaler, bf16 needs none."""
    import mindspore as ms
    from mindspore.amp import DynamicLossScaler, auto_mixed_precision

    if compute == ms.float32:
        return unet, None
    step_net = auto_mixed_precision(unet, amp_level="O2", dtype=compute)
    if lora:
        from t2i.interop.lora import cast_frozen

        cast_frozen(unet, compute)
    if compute != ms.float16:
        return step_net, None
    return step_net, DynamicLossScaler(scale_value=2.0**16, scale_factor=2, scale_window=2000)


def build_train_step(unet, optimizer, loss_scaler, max_grad_norm, accumulation, jit=True):
    """mindone's TrainStep (accumulation, unscale, overflow skip) plus the grad norm and whether it stepped; clipping
    by `_fused`'s compiled clip_grad_norm, which also yields the norm.

    jit: the forward+backward runs as one ms.jit graph instead of ~1000 PyNative ops. Tiny UNet, batch 2, 16x16
    latents on the 2-core CPU: ~68 ms vs ~175-200 ms per forward+backward, after ~12 s of compiling once. Without it
    the clip runs op by op too, as the optimizer should (t2i.training.optim.build_adamw's jit)."""
    import mindspore as ms
    from mindone.diffusers.training_utils import TrainStep

    clip_grad_norm = _fused().clip_grad_norm

    class UNetTrainStep(TrainStep):
        clip_norm = ms.Tensor(max_grad_norm, ms.float32)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if jit:
                self.forward_and_backward = ms.jit(self.forward_and_backward)

        def forward(self, noisy, timesteps, target, weights, states, pooled=None, time_ids=None):
            """Inputs in t2i.training.batch.Batch.arrays' order: the fixed four, then the conditioning (SDXL's
            pooled text embedding and time ids as the UNet's added_cond_kwargs)."""
            if pooled is None:
                pred = self.model(noisy, timesteps, states)[0].float()
            else:
                added = {"text_embeds": pooled, "time_ids": time_ids}
                pred = self.model(noisy, timesteps, states, added_cond_kwargs=added)[0].float()
            per_sample = ((pred - target) ** 2).mean(axis=(1, 2, 3))
            loss = (per_sample * weights).mean()
            return self.scale_loss(loss), per_sample

        def construct(self, *inputs):
            outputs, grads = self.forward_and_backward(*inputs)
            grads = self.grad_accumulator.step(grads)
            grad_norm = ms.Tensor(-1.0, ms.float32)
            stepped = False
            if self.sync_gradients:
                # Unscaled and clipped inside the optimizer's update (mindone's grad_scaler.unscale is one PyNative
                # op per parameter). The pre-clip norm, as accelerate's clip_grad_norm_ reports it; inf/nan on an
                # overflowed step.
                grad_norm, grad_scale = clip_grad_norm(grads, self.clip_norm, self.grad_scaler.loss_scaler.scale_value,
                                                       jit)
                stepped = self.grad_scaler.step(functools.partial(self.optimizer, grad_scale=grad_scale), grads)
                self.grad_scaler.update()
                self.grad_accumulator.zero_grad()
            return self.unscale_loss(outputs[0]) * self.grad_accumulator.gradient_accumulation_steps, grad_norm, stepped

    return UNetTrainStep(
        unet,
        optimizer,
        loss_scaler=loss_scaler,
        max_grad_norm=None,
        gradient_accumulation_steps=accumulation,
        gradient_accumulation_kwargs={"sync_with_dataloader": False},
    )
