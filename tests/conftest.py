"""Test configuration: GPU tests skip on machines without CUDA (CI); everything else runs everywhere.

Without CUDA, Triton kernels run in Triton's interpreter on CPU tensors (`TRITON_INTERPRET=1`), which is how the
`test_kernels_*` modules check them against the reference in CI. Triton reads the variable when a kernel is
decorated, i.e. when `moe_inductor.kernels.<family>` is first imported, so it is set here, before any test module.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run through the device tool)")
    skip_interpreter = pytest.mark.skip(reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not INTERPRETING:
            item.add_marker(skip_interpreter)
