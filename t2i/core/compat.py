"""Every place where t2i depends on which MindSpore is installed, named once.

pyproject.toml accepts MindSpore >=2.7.1,<2.11: mindone 0.5.0 is tested on 2.6.0-2.7.1 (Ascend), and on Ascend the
MindSpore version follows the installed CANN. `make test` runs the whole suite on 2.10.0, `make test-ms27` a smaller
set on 2.7.1 (Makefile). Each check below asks the installed MindSpore what it offers (an attribute, whether a tiny
graph compiles, the wheel's files), never its version string; the comment above each says which versions need the
workaround that the check switches on, and where that workaround lives. tests/test_compat.py tests each check.

| check                           | 2.7.1         | 2.8.0-2.10.0 | what t2i does when it is true             |
|---------------------------------|---------------|--------------|-------------------------------------------|
| mindone_gradient_checkpointing  | false         | false        | mindone's                                 |
|                                 |               |              | unet.enable_gradient_checkpointing()      |
|                                 |               |              | (else Cell.recompute on each ResNet and   |
|                                 |               |              | attention layer: t2i.interop.models)      |
| cpu_graph_ops_missing           | split, chunk, | none         | mint.split/chunk/narrow through           |
|                                 | narrow        |              | t2i.core.cpu_ops.MINT_GRAPH (CPU only)    |
| mint_nn_inits_naming_themselves | GELU          | none         | that __init__ gets its own class under    |
|                                 |               |              | its name (cpu_ops._bind_own_name, CPU)    |
| msrun_scheduler                 | (all)         | (all)        | cpu_graph_ops_missing compiles nothing    |
| gpu_plugins                     | CUDA 11.1,    | same         | named in the GPU refusal (t2i refuses GPU |
|                                 | 11.6          |              | on every version: t2i.core.runtime.setup) |

2.8.0 and 2.9.0 were checked with the checks above and a subset of the tests (compat, CPU ops, the compiled step,
exact resume, msrun); CI runs 2.7.1 and 2.10.0.
"""

import functools
import os
from pathlib import Path


# All of 2.7.1-2.10.0: mindone 0.5.0's ModelMixin.enable_gradient_checkpointing() calls Cell.recompute_ on the UNet's
# cells, which no MindSpore in the range has (it raises "does not support gradient checkpointing"); then
# t2i.interop.models.enable_gradient_checkpointing marks each ResNet and transformer layer with Cell.recompute().
def mindone_gradient_checkpointing() -> bool:
    """Whether mindone's own unet.enable_gradient_checkpointing() can work here (Cell has recompute_)."""
    from mindspore import nn

    return hasattr(nn.Cell, "recompute_")


# 2.7.x only: its CPU backend has no kernel for these mint ops inside an ms.jit graph (SplitWithSize/SplitTensor,
# Chunk, Narrow: "Unsupported op [...] on CPU"), though PyNative runs them; 2.8.0-2.10.0 compile all four. mindone's
# UNet calls mint.split in its timestep embedding (every SD UNet: without a substitute no compiled train step or
# compiled sampling compiles on 2.7 CPU) and mint.chunk in ResnetBlock2D's scale-shift norm. t2i.core.cpu_ops.MINT_GRAPH
# holds the substitutes.
GRAPH_OPS = ("split", "chunk", "narrow")


@functools.cache
def cpu_graph_ops_missing() -> tuple:
    """The names in GRAPH_OPS whose `mindspore.mint` op does not compile in an ms.jit graph on CPU, found by compiling
    a tiny graph of each (0.2-0.4 s in all, once per process). Call with the CPU device target set and before
    t2i.core.cpu_ops.install replaces anything. Empty in msrun's scheduler process, which compiles nothing."""
    import mindspore as ms
    import numpy as np
    from mindspore import mint

    if msrun_scheduler():
        return ()
    x = ms.Tensor(np.arange(8, dtype=np.float32).reshape(2, 4))

    def split(x):
        return mint.split(x, [1, 3], dim=1)[1] + mint.split(x, 2, dim=1)[0].sum()

    def chunk(x):
        return mint.chunk(x, 2, 1)[1]

    def narrow(x):
        return mint.narrow(x, 1, 1, 2)

    missing = []
    for name, fn in (("split", split), ("chunk", chunk), ("narrow", narrow)):
        try:
            ms.jit(fn)(x).asnumpy()
        except (RuntimeError, TypeError, ValueError):
            missing.append(name)
    return tuple(missing)


# All of 2.7.1-2.10.0: any ms.jit compile before mindspore.communication.init() in msrun's scheduler process makes it
# abort at exit ("terminate called without an active exception") and msrun fail the job, so the probe above must not
# run there. The scheduler (MS_ROLE=MS_SCHED, set by msrun) runs the script only until init(), which serves the
# cluster and ends the process.
def msrun_scheduler() -> bool:
    return os.environ.get("MS_ROLE") == "MS_SCHED"


# 2.7.x: mint.nn.GELU.__init__ calls super(GELU, self) with GELU looked up in mindspore.mint.nn, where
# t2i.core.cpu_ops puts its subclass, so building a GELU recursed without end; 2.8.0-2.10.0 call super().__init__().
@functools.cache
def mint_nn_inits_naming_themselves(names: tuple) -> tuple:
    """The names among `names` whose `mindspore.mint.nn` class's own __init__ looks the class up by that name in the
    module mindspore.mint.nn (t2i.core.cpu_ops.install then gives that __init__ the original class under the name).
    Call before install replaces anything."""
    from mindspore import mint

    found = []
    for name in names:
        init = vars(getattr(mint.nn, name)).get("__init__")
        code = getattr(init, "__code__", None)
        if code is not None and init.__globals__ is vars(mint.nn) and name in code.co_names:
            found.append(name)
    return tuple(found)


def gpu_plugins() -> list:
    """The CUDA versions the installed MindSpore wheel has GPU plugins for (e.g. ["11.1", "11.6"] for 2.7.1-2.10.0:
    libmindspore_gpu.so.<cuda> in mindspore/lib/plugin); empty when it has none."""
    import mindspore

    plugins = Path(mindspore.__file__).parent / "lib" / "plugin"
    return sorted(p.name.split(".so.", 1)[1] for p in plugins.glob("libmindspore_gpu.so.*"))


def gpu_refusal() -> str:
    """Why t2i does not run on GPU, in one line (t2i.core.runtime.setup raises it for --device_target GPU)."""
    cuda = ", ".join(gpu_plugins()) or "none"
    return ("--device_target / MS_DEVICE_TARGET: GPU is not supported; t2i runs on CPU and Ascend only (mindone 0.5.0 "
            f"is tested on Ascend, this MindSpore's GPU plugins are for CUDA {cuda} only, and t2i has never run on a "
            "GPU); use --device_target CPU or Ascend")
