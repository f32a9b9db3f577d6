"""--device_target: which of the flag, $MS_DEVICE_TARGET and MindSpore's own backend picks the device, and how the
name is checked. Detection is replaced, and runtime.setup is never called (it changes process-wide MindSpore state)."""

import pytest

from t2i.core import runtime


@pytest.fixture
def detected(monkeypatch):
    """Detection answers "Ascend" (what this machine's MindSpore says is irrelevant) and counts its calls."""
    calls = []

    def detect():
        calls.append(1)
        return "Ascend"

    monkeypatch.setattr(runtime, "detect_device_target", detect)
    monkeypatch.delenv("MS_DEVICE_TARGET", raising=False)
    return calls


def test_the_flag_wins_over_the_environment_which_wins_over_detection(detected, monkeypatch):
    assert runtime.resolve_device_target() == "Ascend"  # neither flag nor environment: detection
    assert len(detected) == 1
    monkeypatch.setenv("MS_DEVICE_TARGET", "GPU")
    assert runtime.resolve_device_target() == "GPU"
    assert runtime.resolve_device_target(None) == "GPU"
    assert runtime.resolve_device_target("CPU") == "CPU"
    assert len(detected) == 1  # detection is only asked when nothing names a device
    monkeypatch.setenv("MS_DEVICE_TARGET", "")  # set but empty counts as unset
    assert runtime.resolve_device_target() == "Ascend"


@pytest.mark.parametrize("given, name", [("cpu", "CPU"), ("Cpu", "CPU"), ("CPU", "CPU"), ("gpu", "GPU"),
                                         ("GPU", "GPU"), ("ascend", "Ascend"), ("ASCEND", "Ascend"),
                                         ("Ascend", "Ascend")])
def test_device_names_are_case_insensitive_and_come_back_as_mindspore_spells_them(detected, monkeypatch, given, name):
    assert runtime.resolve_device_target(given) == name
    monkeypatch.setenv("MS_DEVICE_TARGET", given)
    assert runtime.resolve_device_target() == name


def test_an_unknown_device_is_an_error_naming_it_and_the_choices(detected, monkeypatch):
    with pytest.raises(ValueError, match=r"--device_target / MS_DEVICE_TARGET: unknown device 'tpu'; "
                                         r"use CPU, GPU or Ascend"):
        runtime.resolve_device_target("tpu")
    # A wrong environment value is an error too, not a silent fall back to detection.
    monkeypatch.setenv("MS_DEVICE_TARGET", "npu")
    with pytest.raises(ValueError, match="unknown device 'npu'"):
        runtime.resolve_device_target()
    # ... but a valid flag overrides it.
    assert runtime.resolve_device_target("gpu") == "GPU"
