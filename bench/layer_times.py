"""Where the SD-1.5 UNet forward's time goes, MindSpore against PyTorch: one forward (batch 1, 64x64 latents, 77x768
text, random weights, after a warm-up) timed per layer type by hooks on every leaf layer and every attention block,
MindSpore op by op (synchronous on CPU) and PyTorch eager, each in a process of its own.

`python -m bench.layer_times` runs both sides and prints the table bench/README.md keeps; `--side ms|torch` is one
side (the torch side runs in .venv-peer, so this module imports neither framework at the top)."""

import json
import os
import subprocess
import sys
import time
from collections import defaultdict

from bench import PEER_PYTHON, ROOT, SD15_UNET


class LayerClock:
    """Seconds and calls per layer type; a layer inside an attention block is counted apart ("Linear (in
    attention)"), so that attention minus its projections is the attention core (scores, softmax, weighted sum)."""

    def __init__(self):
        self.seconds, self.calls, self.starts, self.depth = defaultdict(float), defaultdict(int), {}, 0

    def enter(self, kind, name):
        self.depth += kind == "Attention"
        self.starts[name] = time.perf_counter()

    def leave(self, kind, name):
        elapsed = time.perf_counter() - self.starts[name]
        self.depth -= kind == "Attention"
        key = f"{kind} (in attention)" if kind != "Attention" and self.depth > 0 else kind
        self.seconds[key] += elapsed
        self.calls[key] += 1


def mindspore_forward(clock):
    import mindspore as ms
    import numpy as np
    from mindone.diffusers import UNet2DConditionModel

    from t2i.core import runtime

    runtime.setup("CPU")
    ms.set_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    unet.set_train(False)
    for name, cell in unet.cells_and_names():
        kind = type(cell).__name__
        if not list(cell.cells()) or kind == "Attention":
            cell.register_forward_pre_hook(lambda c, *a, k=kind, n=name: clock.enter(k, n))
            cell.register_forward_hook(lambda c, *a, k=kind, n=name: clock.leave(k, n))
    rng = np.random.default_rng(0)
    inputs = (ms.Tensor(rng.standard_normal((1, 4, 64, 64), dtype=np.float32)), ms.Tensor(np.array([500], np.int32)),
              ms.Tensor(rng.standard_normal((1, 77, 768), dtype=np.float32)))
    return lambda: unet(*inputs)[0].asnumpy()


def torch_forward(clock):
    import diffusers
    import torch

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**SD15_UNET).eval()
    for name, module in unet.named_modules():
        kind = type(module).__name__
        if not list(module.children()) or kind == "Attention":
            module.register_forward_pre_hook(lambda m, a, k=kind, n=name: clock.enter(k, n))
            module.register_forward_hook(lambda m, a, o, k=kind, n=name: clock.leave(k, n))
    inputs = (torch.randn(1, 4, 64, 64), torch.tensor([500]), torch.randn(1, 77, 768))

    def run():
        with torch.no_grad():
            unet(*inputs)

    return run


def measure(side) -> dict:
    clock = LayerClock()
    run = (mindspore_forward if side == "ms" else torch_forward)(clock)
    run()
    clock.seconds.clear()
    clock.calls.clear()
    tick = time.perf_counter()
    run()
    return {"total_s": time.perf_counter() - tick, "seconds": dict(clock.seconds), "calls": dict(clock.calls)}


def by_part(r) -> dict:
    """Seconds per part of the forward: the attention core is the attention blocks minus the layers inside them; what
    no hook covers (residual adds, reshapes, the time embedding's arithmetic, GEGLU's gate) is the rest."""
    s = r["seconds"]
    inside = sum(v for k, v in s.items() if k.endswith("(in attention)"))
    parts = {"Conv2d": s.get("Conv2d", 0.0),
             "attention core": s.get("Attention", 0.0) - inside,
             "Linear": s.get("Linear", 0.0) + s.get("Linear (in attention)", 0.0),
             "GroupNorm + LayerNorm": s.get("GroupNorm", 0.0) + s.get("LayerNorm", 0.0)}
    hooked = sum(v for k, v in s.items() if not k.endswith("(in attention)"))
    parts["other layers (SiLU, Dropout, ...)"] = hooked - sum(parts.values())
    parts["ops outside any layer"] = r["total_s"] - hooked
    parts["total"] = r["total_s"]
    return parts


def table(ms_result, torch_result) -> str:
    a, b = by_part(ms_result), by_part(torch_result)
    gap = a["total"] - b["total"]
    lines = ["| part of the forward | MindSpore | PyTorch | ratio | share of the gap |", "|---|---|---|---|---|"]
    for key in a:
        lines.append(f"| {key} | {a[key]:.2f} s | {b[key]:.2f} s | {a[key] / b[key]:.2f} | "
                     f"{(a[key] - b[key]) / gap:.0%} |")
    return "\n".join(lines)


def main(argv):
    if "--side" in argv:
        print(json.dumps(measure(argv[argv.index("--side") + 1])))
        return
    results = {}
    for side, python in (("ms", sys.executable), ("torch", str(PEER_PYTHON))):
        out = subprocess.run([python, "-m", "bench.layer_times", "--side", side], cwd=ROOT, check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
        results[side] = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(results))
    print(table(results["ms"], results["torch"]))


if __name__ == "__main__":
    main(sys.argv[1:])
