"""Device setup: one call at the start of every command, before any mindone model is built."""

import os
from pathlib import Path

import mindspore as ms

_DEVICE_ENV = "MS_DEVICE_TARGET"


def detect_device_target() -> str:
    """The backend MindSpore was built for and can reach (Ascend, GPU or CPU; setup refuses GPU)."""
    return ms.get_context("device_target")


def resolve_device_target(device_target: str | None = None) -> str:
    target = device_target or os.environ.get(_DEVICE_ENV) or detect_device_target()
    names = {"cpu": "CPU", "gpu": "GPU", "ascend": "Ascend"}
    if target.lower() not in names:
        raise ValueError(f"--device_target / {_DEVICE_ENV}: unknown device {target!r}; use CPU, GPU or Ascend")
    return names[target.lower()]


def setup(device_target: str | None = None) -> str:
    """Select the device, PyNative mode, and on CPU route mindone's missing ops to `t2i.core.cpu_ops`.

    GPU is refused with one line (t2i.core.compat.gpu_refusal) before MindSpore is asked for it: on a machine without
    CUDA 11, MindSpore's own answer is "Unsupported device target GPU" with a C++ call stack."""
    target = resolve_device_target(device_target)
    if target == "GPU":
        from t2i.core import compat

        raise ValueError(compat.gpu_refusal())
    # pynative_synchronize on CPU: ops run in the calling thread instead of an async queue, ~3x faster with 2 cores.
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target=target, pynative_synchronize=(target == "CPU"))
    if target == "CPU":
        from t2i.core import cpu_ops

        cpu_ops.install()
    return target


def available_memory() -> int:
    """Bytes of memory the machine can still give (Linux's MemAvailable; elsewhere its free pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def init_distributed() -> tuple:
    """Join the workers started by msrun (or mpirun) in data-parallel mode with gradient averaging.

    Returns (rank, world size). mindone's GradAccumulator sees the DATA_PARALLEL mode and all-reduces gradients.
    """
    from mindspore.communication import get_group_size, get_rank, init

    init()
    world = get_group_size()
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(
        parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=world
    )
    return get_rank(), world
