"""Devices come from ggml's backend registry."""

from __future__ import annotations

from pathlib import Path

import pydgemma


def test_cpu_device_is_listed() -> None:
    devs = pydgemma.devices()
    assert len({d.name for d in devs}) == len(devs)
    cpus = [d for d in devs if d.type == "cpu"]
    assert [(d.name, d.backend) for d in cpus] == [("CPU", "CPU")], devs  # ggml registers one CPU device
    assert cpus[0].memory_total > 0 and 0 < cpus[0].memory_free <= cpus[0].memory_total


def test_each_device_can_be_chosen(tiny_model_path: Path) -> None:
    for dev in pydgemma.devices():
        assert pydgemma.Model(tiny_model_path, device=dev.name).device == dev.name
        assert pydgemma.Model(tiny_model_path, device=dev.name.lower()).device == dev.name


def test_auto_prefers_a_gpu(tiny_model_path: Path) -> None:
    devs = pydgemma.devices()
    gpus = [d.name for d in devs if d.type == "gpu"]
    expected = gpus[0] if gpus else next(d.name for d in devs if d.type == "cpu")
    assert pydgemma.Model(tiny_model_path).device == expected
    assert pydgemma.Model(tiny_model_path, device="cpu").device == next(d.name for d in devs if d.type == "cpu")
