"""Plain-torch implementations of every op: the CPU kernels and the oracle the device kernels are tested against.

One module per op family. Nothing here registers anything or validates arguments (that is `moe_inductor.ops`);
functions take already-checked arguments and return the op's outputs, forward and backward.
"""

from . import grouped_matmul, init_routing, multihot, permutation

__all__ = ["grouped_matmul", "init_routing", "multihot", "permutation"]
