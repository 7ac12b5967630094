"""Triton kernels for CUDA, one module per op family, each with the same functions as `moe_inductor.reference`.

The op bodies in `moe_inductor.ops` pick `kernels` or `reference` by device (`ops._registry.backend`) and call
`<package>.<family>.<function>(...)` the same way on both. Family modules are imported on first use, so that
`import moe_inductor` does not import Triton.
"""

from __future__ import annotations

import importlib

FAMILIES = ("grouped_matmul", "init_routing", "multihot", "permutation")


def __getattr__(name: str):
    if name in FAMILIES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
