"""The optimizer train steps: AdamW with torch.optim.AdamW's update.

mindspore.nn.AdamWeightDecay (what mindone's create_optimizer calls "adamw") has no bias correction, so its first step
moves every weight by (1 - beta1) / sqrt(1 - beta2) * lr = 3.16 * lr where torch moves it by lr. Of the other AdamWs
on hand, mindone's adamw_mint.AdamW and mindspore.mint.optim.AdamW call the fused AdamW kernel, which MindSpore's CPU
backend lacks ("kernel ZerosLikeExt / AdamW unregistered"), and mindspore.experimental.optim.AdamW takes a float lr
driven by its own LRScheduler classes (no per-step list, no global_step). mindcv's AdamW (mindone's create_optimizer
"adamw_re"; mindone pins mindcv) runs on every backend and is torch's update:
p -= lr * (wd * p + m_hat / (sqrt(v_hat) + eps)) with m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t), which is
torch's p *= 1 - lr * wd; p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps).
It is a nn.Optimizer (a list lr becomes `learning_rate`, indexed by `global_step`) whose update is one HyperMap in
one ms.jit graph, and its state is Parameters: adam_m.*, adam_v.*, beta1_power, beta2_power (beta^t, i.e. the step
count) and global_step, so saving and restoring the optimizer's Parameters by name resumes it exactly.
"""


def build_adamw(params, learning_rate, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2):
    """AdamW over `params` with torch.optim.AdamW's update; learning_rate is a float or a per-step list (optimizer
    step s, counted by `global_step`, uses learning_rate[s])."""
    from mindcv.optim.adamw import AdamW

    # One group: given a plain list, nn.Optimizer skips weight decay for parameters named *beta*/*gamma*; torch
    # decays every parameter.
    return AdamW([{"params": list(params), "weight_decay": weight_decay}], learning_rate=learning_rate,
                 beta1=beta1, beta2=beta2, eps=eps)
