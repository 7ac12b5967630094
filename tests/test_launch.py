"""How kernels are launched: on the device of their tensors, whatever the current CUDA device (runs on CPU with a
stand-in for the CUDA device context; tests/test_ops_cuda.py runs the ops on a second GPU)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

launch = pytest.importorskip("moe_inductor.kernels._launch")


class _Kernel:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(("launch", grid, args, kwargs))


def _cuda_like(index):
    return SimpleNamespace(is_cuda=True, device=torch.device("cuda", index))


@pytest.fixture
def log(monkeypatch):
    log = []

    @contextlib.contextmanager
    def device(index):
        log.append(("enter", index))
        yield
        log.append(("exit", index))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(launch, "_traced", lambda t: False)
    return log


def test_a_launch_on_another_gpu_makes_that_device_current(log):
    launch.launcher(_Kernel(log), _cuda_like(1))[(7,)](1, 2, BLOCK=4)
    assert log == [("enter", 1), ("launch", (7,), (1, 2), {"BLOCK": 4}), ("exit", 1)]


def test_a_launch_on_the_current_gpu_or_the_cpu_adds_nothing(log):
    kernel = _Kernel(log)
    assert launch.launcher(kernel, _cuda_like(0)) is kernel
    assert launch.launcher(kernel, torch.empty(1)) is kernel
