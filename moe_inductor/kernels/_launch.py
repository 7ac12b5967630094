"""How every launcher in `moe_inductor.kernels` starts a Triton kernel.

Eager calls on real tensors launch the `@triton.jit` function directly. While `torch.compile` traces an op's body
(its arguments are fake or functional tensors), the kernel goes through `torch.library.wrap_triton`, which records
it in the graph so that Inductor emits the launch into its generated code. Under `TRITON_INTERPRET=1` (CPU tests)
kernels are interpreted functions and are always launched directly.

Triton launches on the current CUDA device and stream. Custom ops get no device guard from the dispatcher, so an
eager call on tensors of another GPU (a second model replica, pipeline stages in one process) switches to their device
for the launch; Inductor's generated code sets the device itself.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensor
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction


def _traced(t: torch.Tensor) -> bool:
    return isinstance(t, FunctionalTensor) or is_fake(t)


class _OnDevice:
    """`kernel[grid](...)` run with `index` as the current CUDA device (and so on that device's current stream)."""

    def __init__(self, kernel, index: int):
        self.kernel, self.index = kernel, index

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            with torch.cuda.device(self.index):
                return launch(*args, **kwargs)

        return run


def launcher(kernel, like: torch.Tensor):
    """`launcher(kernel, x)[grid](...)`: the kernel, wrapped for tracing when `x` is being traced, and launched on
    `x`'s device when that is not the current one."""
    # Interpreted kernels (TRITON_INTERPRET=1) are neither, and always launch directly.
    compiled = isinstance(kernel, JITFunction) or (isinstance(kernel, Autotuner) and isinstance(kernel.fn, JITFunction))
    if compiled and _traced(like):
        return torch.library.wrap_triton(kernel)
    if like.is_cuda and like.device.index != torch.cuda.current_device():
        return _OnDevice(kernel, like.device.index)
    return kernel


def size_hint(n) -> int | None:
    """A size's example value without guarding on it (None for data-dependent sizes): for tuning choices only."""
    if isinstance(n, int):
        return n
    return n.node.hint if n.node.has_hint() else None


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
