import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from t2i.training.optim import build_adamw

LRS = [1e-2, 3e-3, 2e-2, 5e-3, 1e-2, 7e-3]  # a per-step list like diffusers' get_scheduler, not constant
BETAS = (0.9, 0.999)


class DenseNorm(nn.Cell):
    """Dense + LayerNorm: mindspore names the LayerNorm's parameters gamma and beta, the names nn.Optimizer exempts
    from weight decay unless told otherwise (torch decays every parameter). Not a SequentialCell: its set_grad returns
    None, which mindone's TrainStep keeps as its model."""

    def __init__(self):
        super().__init__()
        self.dense, self.norm = nn.Dense(4, 3), nn.LayerNorm((3,))

    def construct(self, x):
        return self.norm(self.dense(x))


def make_model(seed=0):
    net = DenseNorm()
    rng = np.random.default_rng(seed)
    for p in net.trainable_params():
        p.set_data(ms.Tensor(rng.normal(size=p.shape).astype(np.float32)))
    return net


def make_grads(net, steps, seed=1):
    """Per step, per parameter: random signs and magnitudes from 1e-3 to 10, different every step."""
    rng = np.random.default_rng(seed)
    return [[(rng.normal(size=p.shape) * 10 ** rng.uniform(-3, 1, size=p.shape)).astype(np.float32)
             for p in net.trainable_params()] for _ in range(steps)]


def weights(net):
    return [p.asnumpy().copy() for p in net.trainable_params()]


def torch_adamw(params, grads, lrs, beta1, beta2, eps, weight_decay):
    """torch.optim.AdamW.step (torch/optim/adamw.py, _single_tensor_adamw; amsgrad and maximize off) in float64."""
    params = [p.astype(np.float64) for p in params]
    exp_avg = [np.zeros_like(p) for p in params]
    exp_avg_sq = [np.zeros_like(p) for p in params]
    for step, (step_grads, lr) in enumerate(zip(grads, lrs), start=1):
        for i, grad in enumerate(step_grads):
            grad = grad.astype(np.float64)
            params[i] *= 1 - lr * weight_decay
            exp_avg[i] += (grad - exp_avg[i]) * (1 - beta1)  # lerp_(grad, 1 - beta1)
            exp_avg_sq[i] = exp_avg_sq[i] * beta2 + grad * grad * (1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            denom = np.sqrt(exp_avg_sq[i]) / np.sqrt(bias_correction2) + eps
            params[i] -= lr / bias_correction1 * exp_avg[i] / denom
    return params


def run_steps(optimizer, grads):
    for step_grads in grads:
        optimizer(tuple(ms.Tensor(g) for g in step_grads))


def optimizer_state(optimizer, net):
    """What train's save_checkpoint stores: the optimizer's Parameters by name minus the model's and the lr list's."""
    skip = {id(p) for p in list(net.get_parameters()) + list(optimizer.learning_rate.get_parameters())}
    return {name: p.asnumpy().copy() for name, p in optimizer.parameters_and_names() if id(p) not in skip}


def assert_weights(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-6)


# eps 1e-3 is comparable to the small gradients, so adding it anywhere but after sqrt(v_hat) would show. jit=False:
# the update op by op, as t2i-train --no_jit runs it.
@pytest.mark.parametrize("eps,jit", [(1e-8, True), (1e-3, True), (1e-3, False)])
def test_matches_torch_adamw_over_several_steps(eps, jit):
    net = make_model()
    start = weights(net)
    grads = make_grads(net, 5)
    optimizer = build_adamw(net.trainable_params(), LRS, *BETAS, eps=eps, weight_decay=1e-2, jit=jit)
    run_steps(optimizer, grads)
    assert_weights(weights(net), torch_adamw(start, grads, LRS, *BETAS, eps=eps, weight_decay=1e-2))
    assert int(optimizer.global_step.asnumpy().reshape(-1)[0]) == 5  # train reads the lr it logs at global_step


def test_first_step_moves_each_weight_by_lr():
    """Bias correction: m_hat / sqrt(v_hat) = g / |g| on step 1, so every weight moves by lr against its gradient
    (nn.AdamWeightDecay moves it by (1 - beta1) / sqrt(1 - beta2) * lr = 3.16 * lr)."""
    lr = 1e-3
    net = make_model()
    start = weights(net)
    grads = make_grads(net, 1)
    optimizer = build_adamw(net.trainable_params(), [lr] * 3, *BETAS, eps=1e-8, weight_decay=0.0)
    run_steps(optimizer, grads)
    for before, after, grad in zip(start, weights(net), grads[0], strict=True):
        np.testing.assert_allclose(after - before, -lr * np.sign(grad), rtol=1e-3)


@pytest.mark.parametrize("jit", [True, False])
def test_resume_from_saved_parameters_matches_uninterrupted(jit):
    k, total = 3, len(LRS)
    grads = make_grads(make_model(), total)
    uninterrupted = make_model()
    run_steps(build_adamw(uninterrupted.trainable_params(), LRS, *BETAS, eps=1e-8, weight_decay=1e-2, jit=jit), grads)

    first = make_model()
    optimizer = build_adamw(first.trainable_params(), LRS, *BETAS, eps=1e-8, weight_decay=1e-2, jit=jit)
    run_steps(optimizer, grads[:k])
    saved_weights, saved_state = weights(first), optimizer_state(optimizer, first)

    def resumed(restore):
        net = make_model(seed=7)  # a fresh run: its own initial weights, replaced by the checkpoint's
        for p, w in zip(net.trainable_params(), saved_weights, strict=True):
            p.set_data(ms.Tensor(w))
        optimizer = build_adamw(net.trainable_params(), LRS, *BETAS, eps=1e-8, weight_decay=1e-2, jit=jit)
        if restore:  # as train's load_checkpoint does
            params = dict(optimizer.parameters_and_names())
            for name, value in saved_state.items():
                params[name].set_data(ms.Tensor(value))
        run_steps(optimizer, grads[k:])
        return net, optimizer

    net, optimizer = resumed(restore=True)
    assert_weights(weights(net), weights(uninterrupted))
    assert int(optimizer.global_step.asnumpy().reshape(-1)[0]) == total
    # The saved state is what makes it exact: fresh moments, step count and lr position land elsewhere.
    fresh, _ = resumed(restore=False)
    assert max(np.abs(a - b).max() for a, b in zip(weights(fresh), weights(uninterrupted))) > 1e-3


def test_steps_inside_ms_jit():
    net = make_model()
    start = weights(net)
    grads = make_grads(net, 4)
    optimizer = build_adamw(net.trainable_params(), LRS, *BETAS, eps=1e-8, weight_decay=1e-2)

    @ms.jit
    def step(step_grads):
        return optimizer(step_grads)

    for step_grads in grads:
        step(ms.mutable(tuple(ms.Tensor(g) for g in step_grads)))
    assert_weights(weights(net), torch_adamw(start, grads, LRS, *BETAS, eps=1e-8, weight_decay=1e-2))


def test_steps_as_mindone_train_step_optimizer():
    """Through mindone's TrainStep with a loss scaler, whose GradScaler.step calls optimizer(grads), as train's does:
    the same weights as calling the optimizer directly with the gradients."""
    from mindone.diffusers.training_utils import TrainStep
    from mindspore.amp import DynamicLossScaler

    class MSETrainStep(TrainStep):
        def forward(self, x, y):
            loss = ((self.model(x) - y) ** 2).mean()
            return self.scale_loss(loss), loss

    rng = np.random.default_rng(2)
    batches = [tuple(ms.Tensor(rng.normal(size=(5, n)).astype(np.float32)) for n in (4, 3)) for _ in range(3)]
    net = make_model()
    train_step = MSETrainStep(
        net, build_adamw(net.trainable_params(), LRS, *BETAS, eps=1e-8, weight_decay=1e-2),
        loss_scaler=DynamicLossScaler(scale_value=2.0**10, scale_factor=2, scale_window=2000),
        gradient_accumulation_steps=1, gradient_accumulation_kwargs={"sync_with_dataloader": False},
    )
    direct = make_model()
    optimizer = build_adamw(direct.trainable_params(), LRS, *BETAS, eps=1e-8, weight_decay=1e-2)
    grad_fn = ms.grad(lambda x, y: ((direct(x) - y) ** 2).mean(), grad_position=None, weights=direct.trainable_params())
    for x, y in batches:
        train_step(x, y)
        optimizer(grad_fn(x, y))
    assert int(train_step.optimizer.global_step.asnumpy().reshape(-1)[0]) == len(batches)
    assert_weights(weights(net), weights(direct))
    assert max(np.abs(a - b).max() for a, b in zip(weights(net), weights(make_model()))) > 1e-3  # it did train


def test_grad_scale_multiplies_each_gradient():
    """optimizer(grads, grad_scale=s) (the train step's unscale and clip factor) is the update for grads * s."""
    net = make_model()
    start = weights(net)
    grads = make_grads(net, 3)
    scales = [0.25, 1 / 1024, 3.0]
    optimizer = build_adamw(net.trainable_params(), LRS, *BETAS, eps=1e-3, weight_decay=1e-2)
    for step_grads, s in zip(grads, scales):
        optimizer(tuple(ms.Tensor(g) for g in step_grads), grad_scale=ms.Tensor(s, ms.float32))
    expected = torch_adamw(start, [[g * s for g in gs] for gs, s in zip(grads, scales)], LRS, *BETAS, eps=1e-3,
                           weight_decay=1e-2)
    assert_weights(weights(net), expected)
