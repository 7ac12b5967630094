"""What every NPU kernel module shares: the torch_npu handle and the dtypes its fused kernels accept."""

from __future__ import annotations

import importlib

import torch

#: Floating dtypes of torch_npu's MoE kernels; other dtypes (float64) run the plain-torch reference on the device.
KERNEL_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def torch_npu():
    """The torch_npu module, imported on first use so that this package imports without it (tests, CPU machines)."""
    return importlib.import_module("torch_npu")


def native(*tensors) -> bool:
    """Whether torch_npu's kernels take these floating tensors (None skipped): a kernel dtype, and not empty.

    torch_npu does not document its MoE kernels for zero-size inputs, so those run the reference too (it is cheap).
    """
    present = [t for t in tensors if t is not None]
    return all(t.dtype in KERNEL_FLOATS for t in present) and all(t.numel() > 0 for t in present)
