"""Device setup: one call at the start of every command, before any mindone model is built."""

import os

import mindspore as ms

_DEVICE_ENV = "MS_DEVICE_TARGET"


def detect_device_target() -> str:
    """The backend MindSpore was built for and can reach (Ascend, GPU or CPU)."""
    return ms.get_context("device_target")


def resolve_device_target(device_target: str | None = None) -> str:
    target = device_target or os.environ.get(_DEVICE_ENV) or detect_device_target()
    names = {"cpu": "CPU", "gpu": "GPU", "ascend": "Ascend"}
    if target.lower() not in names:
        raise ValueError(f"--device_target / {_DEVICE_ENV}: unknown device {target!r}; use CPU, GPU or Ascend")
    return names[target.lower()]


def setup(device_target: str | None = None) -> str:
    """Select the device, PyNative mode, and on CPU route mindone's missing ops to `t2i.cpu_ops`."""
    target = resolve_device_target(device_target)
    # pynative_synchronize on CPU: ops run in the calling thread instead of an async queue, ~3x faster with 2 cores.
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target=target, pynative_synchronize=(target == "CPU"))
    if target == "CPU":
        from t2i import cpu_ops

        cpu_ops.install()
    return target
