"""Public ops. Importing this package registers every op in the `moe_inductor` torch.library namespace.

Each function keeps the argument names of the API it replaces (torch_npu / MindSpeed for the NPU-derived ops,
Megatron-LM for `permute`, `unpermute`, `fused_indices_to_multihot`), so existing calls switch over unchanged.
The underlying ops are also reachable as `torch.ops.moe_inductor.<name>`; `OPS` maps every op name to its
definition.
"""

from ._registry import OPS
from .grouped_matmul import gmm, gmm_v2
from .init_routing import moe_finalize_routing, moe_init_routing_v2
from .multihot import fused_indices_to_multihot, indices_to_multihot, multihot_to_indices, position_map
from .permutation import moe_token_permute_with_routing_map, moe_token_unpermute_with_routing_map, permute, unpermute

# torch_npu / MindSpeed spellings, for code that imported them from there.
npu_moe_token_permute_with_routing_map = moe_token_permute_with_routing_map
npu_moe_token_unpermute_with_routing_map = moe_token_unpermute_with_routing_map
npu_moe_init_routing_v2 = moe_init_routing_v2
npu_moe_finalize_routing = moe_finalize_routing
npu_gmm = gmm
npu_gmm_v2 = gmm_v2

__all__ = [
    "OPS",
    "fused_indices_to_multihot",
    "gmm",
    "gmm_v2",
    "indices_to_multihot",
    "moe_finalize_routing",
    "moe_init_routing_v2",
    "moe_token_permute_with_routing_map",
    "moe_token_unpermute_with_routing_map",
    "multihot_to_indices",
    "npu_gmm",
    "npu_gmm_v2",
    "npu_moe_finalize_routing",
    "npu_moe_init_routing_v2",
    "npu_moe_token_permute_with_routing_map",
    "npu_moe_token_unpermute_with_routing_map",
    "permute",
    "position_map",
    "unpermute",
]
