"""The one place that turns a schema into a `torch.library` custom op in the `moe_inductor` namespace.

Schemas are written out rather than inferred from type hints so that sizes that can come from tensor shapes are
`SymInt` (they stay symbolic under `torch.compile(dynamic=True)`) while modes and flags are plain `int`/`bool`
(a change of mode is a new graph, not a guard on a symbol).

Each op's Python body is its default kernel, registered for every device: the plain-torch reference on CPU. Device
kernels (Triton on CUDA, torch_npu on Ascend) are added per device with `register_kernel` by their own modules.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch._library.custom_ops import CustomOpDef

NAMESPACE = "moe_inductor"

#: Every op defined by the package, by name, in definition order.
OPS: dict[str, CustomOpDef] = {}


def define(schema: str) -> Callable[[Callable], CustomOpDef]:
    """Decorator: `@define("name(Tensor x, ...) -> Tensor")` over the op's default (reference) kernel."""
    name, _, signature = schema.partition("(")
    signature = "(" + signature

    def decorate(fn: Callable) -> CustomOpDef:
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=(), schema=signature)
        OPS[name] = op
        return op

    return decorate
