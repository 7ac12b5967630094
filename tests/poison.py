"""Poisoned outputs for kernel tests: the kernel module under test gets a `torch` whose `empty`/`empty_like` return
garbage-filled tensors, each followed by a guard region, so a test sees both an element a kernel forgot to write and
a write past the end of an output.

`interpreted_module(name, monkeypatch)` returns the kernel module with that `torch` patched in, or skips when Triton
is not interpreting (tests/conftest.py sets TRITON_INTERPRET=1 on machines without CUDA; a GPU machine skips).
"""

from __future__ import annotations

import importlib
import types

import pytest
import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Whether Triton (its library included) was imported in interpreter mode: only then can kernels run on CPU here.
INTERPRETED = isinstance(tl.sum, InterpretedFunction)

POISON = 0x5A  # int32 0x5A5A5A5A, int8 90, float32 ~1.5e16, bool bytes neither 0 nor 1: never a value kernels write
GUARD = 64  # elements after every output that must stay poisoned


class PoisonedTorch(types.ModuleType):
    """`torch` for a kernel module: `empty`/`empty_like` give garbage-filled tensors, each followed by a guard."""

    def __init__(self):
        super().__init__("torch")
        self.allocations = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, size, *, dtype=None, device=None):
        n = 1
        for s in size:
            n *= s
        base = torch.empty(n + GUARD, dtype=dtype, device=device)
        base.view(torch.uint8).fill_(POISON)
        self.allocations.append((base, n))
        return base[:n].view(size)

    def empty_like(self, t):
        return self.empty(t.shape, dtype=t.dtype, device=t.device)

    def check_guards(self):
        for base, n in self.allocations:
            assert bool((base[n:].view(torch.uint8) == POISON).all()), "a kernel wrote past the end of an output"


def interpreted_module(name: str, monkeypatch) -> tuple[types.ModuleType, PoisonedTorch]:
    """The kernel module `name` with poisoned outputs; the caller checks `poisoned.check_guards()` afterwards."""
    if not INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 from process start (tests/conftest.py sets it without CUDA)")
    module = importlib.import_module(name)
    poisoned = PoisonedTorch()
    monkeypatch.setattr(module, "torch", poisoned)
    return module, poisoned
