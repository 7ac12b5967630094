"""Ascend NPU: our ops on torch_npu's fused kernels, and in torchair's graph mode.

`install()` (a no-op without torch_npu) registers this package as the kernel package of "npu" tensors
(`moe_inductor.ops._registry.DEVICE_KERNELS`), and, when torchair is installed, GE converters for our ops. Nothing
else changes: the op definitions, their validation, fake kernels and autograd formulas are the same on every device.

* Eager: an op's body calls `backend(x)`, i.e. the family modules here, which have the functions and signatures of
  `moe_inductor.reference`: each calls its torch_npu kernel, translating arguments and outputs where torch_npu's
  conventions differ from our op's (see each module). torch_npu has no backward for these kernels, and ours does not
  need one: our autograd formulas call the backward functions here, plain torch running on the NPU.
* torch.compile: the ops in `WHOLE_OPS` are not decomposed into their bodies on the NPU. torchair's graph mode then
  finds them in the graph and maps them to Ascend IR (`converters`); its npugraph_ex mode captures their eager
  wrappers, whose output shapes are our fake kernels' (torch_npu's own meta for init_routing_v2 disagrees with its
  eager kernel; ours follow the kernel). The other ops decompose as on any device.

No Ascend hardware has run this package: it is built from torch_npu's, CANN's and torchair's documented contracts
and tested against a stand-in of them (`tests/npu_standin`).
"""

from __future__ import annotations

import importlib
import sys

from . import grouped_matmul, init_routing, multihot, permutation

__all__ = ["WHOLE_OPS", "grouped_matmul", "init_routing", "install", "multihot", "permutation"]

#: Ops that torch.compile keeps whole on the NPU: the ones with a native kernel and a GE converter.
WHOLE_OPS = frozenset(
    {
        "moe_token_permute_with_routing_map",
        "moe_token_unpermute_with_routing_map",
        "moe_init_routing_v2",
        "moe_finalize_routing",
        "gmm",
        "gmm_v2",
    }
)


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def install() -> bool:
    """Route "npu" tensors to torch_npu's kernels and register the torchair converters; idempotent.

    Returns whether torch_npu is present (False: nothing was done).
    """
    if _optional("torch_npu") is None:
        return False
    from ...ops import _registry

    _registry.DEVICE_KERNELS["npu"] = sys.modules[__name__]
    torchair = _optional("torchair")
    if torchair is not None:
        from . import converters

        converters.register(torchair)
    return True
