"""indices_to_multihot / multihot_to_indices: top-k `[T, K]` ids <-> dense `[T, L]` routing and probs maps.

SPEC §1 (Megatron / NeMo `fused_indices_to_multihot`). An id is routed iff `0 <= id < L`: `-1` marks "not on this
rank" and ids `>= L` belong to other ranks' experts; both are skipped. Ids `< -1` and repeated routed ids within a
row are invalid (rejected on CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check, check_same_device, check_shape, check_tensor, on_cpu
from ._registry import backend, define

# ---------------------------------------------------------------------------------------------------------------------
# indices_to_multihot
# ---------------------------------------------------------------------------------------------------------------------

_I2M = "indices_to_multihot"


def _check_indices_to_multihot(indices: Tensor, probs: Tensor, num_local_experts: int) -> None:
    check_tensor(_I2M, "indices", indices, ndim=2, dtypes=INDEX_DTYPES)
    check_tensor(_I2M, "probs", probs, ndim=2, dtypes=FLOAT_DTYPES)
    check_shape(_I2M, "probs", probs, tuple(indices.shape), "same as indices")
    check_same_device(_I2M, indices=indices, probs=probs)
    check(num_local_experts > 0, f"{_I2M}: 'num_local_experts' must be > 0, got {num_local_experts}")


def _check_routed_ids(op: str, name: str, ids: Tensor, width: int, what: str) -> None:
    """CPU data check: no id below -1, no routed id (in `[0, width)`) twice in a row."""
    if ids.numel() == 0:
        return
    low = int(ids.min())
    check(low >= -1, f"{op}: '{name}' holds {low}; {what} must be >= -1 (-1 marks an unused slot)")
    ids = ids.to(torch.int64)
    routed = torch.where((ids >= 0) & (ids < width), ids, -1)
    ordered = routed.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(repeated.any()):
        row = int(repeated.any(dim=1).nonzero()[0])
        raise ValueError(f"{op}: '{name}' row {row} names the same {what} twice: {ids[row].tolist()}")


# The op returns (probs_map, routing_map), float first: opcheck's autograd test sums all outputs into an accumulator
# typed by the first one, and a bool first output breaks it. The public functions return Megatron's order.
@define(
    "indices_to_multihot(Tensor indices, Tensor probs, int num_local_experts) -> (Tensor probs_map, Tensor routing_map)"
)
def indices_to_multihot_op(indices: Tensor, probs: Tensor, num_local_experts: int) -> tuple[Tensor, Tensor]:
    _check_indices_to_multihot(indices, probs, num_local_experts)
    if on_cpu(indices):
        _check_routed_ids(_I2M, "indices", indices, num_local_experts, "expert id")
    routing_map, probs_map = backend(indices).multihot.indices_to_multihot(indices, probs, num_local_experts)
    return probs_map, routing_map


@indices_to_multihot_op.register_fake
def _(indices, probs, num_local_experts):
    _check_indices_to_multihot(indices, probs, num_local_experts)
    shape = (indices.shape[0], num_local_experts)
    return probs.new_empty(shape), indices.new_empty(shape, dtype=torch.bool)


def _i2m_setup(ctx, inputs, output):
    indices, _, _ = inputs
    ctx.save_for_backward(indices)


def _i2m_backward(ctx, grad_probs_map, grad_routing_map):
    (indices,) = ctx.saved_tensors
    return None, backend(indices).multihot.indices_to_multihot_backward(grad_probs_map, indices), None


indices_to_multihot_op.register_autograd(_i2m_backward, setup_context=_i2m_setup)

# ---------------------------------------------------------------------------------------------------------------------
# multihot_to_indices
# ---------------------------------------------------------------------------------------------------------------------

_M2I = "multihot_to_indices"
_POSITION_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def _check_multihot_to_indices(probs_map: Tensor, position_map: Tensor, topk: int) -> None:
    check_tensor(_M2I, "probs_map", probs_map, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(_M2I, "position_map", position_map, ndim=2, dtypes=_POSITION_DTYPES)
    check_shape(_M2I, "position_map", position_map, tuple(probs_map.shape), "same as probs_map")
    check_same_device(_M2I, probs_map=probs_map, position_map=position_map)
    check(topk > 0, f"{_M2I}: 'topk' must be > 0, got {topk}")


@define("multihot_to_indices(Tensor probs_map, Tensor position_map, int topk) -> Tensor")
def multihot_to_indices_op(probs_map: Tensor, position_map: Tensor, topk: int) -> Tensor:
    _check_multihot_to_indices(probs_map, position_map, topk)
    if on_cpu(position_map) and position_map.numel():
        high = int(position_map.max())
        check(high < topk, f"{_M2I}: 'position_map' holds position {high}, must be < topk={topk}")
        _check_routed_ids(_M2I, "position_map", position_map, topk, "position")
    return backend(probs_map).multihot.multihot_to_indices(probs_map, position_map, topk)


@multihot_to_indices_op.register_fake
def _(probs_map, position_map, topk):
    _check_multihot_to_indices(probs_map, position_map, topk)
    return probs_map.new_empty((probs_map.shape[0], topk))


def _m2i_setup(ctx, inputs, output):
    _, position_map, _ = inputs
    ctx.save_for_backward(position_map)


def _m2i_backward(ctx, grad_probs):
    (position_map,) = ctx.saved_tensors
    return backend(grad_probs).multihot.multihot_to_indices_backward(grad_probs, position_map), None, None


multihot_to_indices_op.register_autograd(_m2i_backward, setup_context=_m2i_setup)

# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def indices_to_multihot(indices: Tensor, probs: Tensor, num_local_experts: int) -> tuple[Tensor, Tensor]:
    """Dense routing map (bool) and probs map `[T, num_local_experts]` from top-k `indices` / `probs` `[T, K]`.

    Ids outside `[0, num_local_experts)` (`-1`, or experts of other ranks) are skipped. Differentiable in `probs`.
    """
    probs_map, routing_map = indices_to_multihot_op(indices, probs, num_local_experts)
    return routing_map, probs_map


def fused_indices_to_multihot(indices: Tensor, probs_indices: Tensor, num_of_local_experts: int):
    """Megatron / NeMo `fused_indices_to_multihot(indices, probs_indices, num_of_local_experts)`."""
    return indices_to_multihot(indices, probs_indices, num_of_local_experts)


def multihot_to_indices(probs_map: Tensor, position_map: Tensor, topk: int) -> Tensor:
    """`probs[t, position_map[t, e]] = probs_map[t, e]` back to `[T, topk]`; positions of -1 are skipped.

    `position_map` holds, at `[t, indices[t, k]]`, the slot `k` the expert came from (-1 elsewhere); build it with
    `position_map(indices, num_local_experts)`. Differentiable in `probs_map`.
    """
    return multihot_to_indices_op(probs_map, position_map, topk)


def position_map(indices: Tensor, num_local_experts: int) -> Tensor:
    """`[T, L]` int64 map: `k` at `[t, indices[t, k]]` for routed ids, -1 elsewhere (input of multihot_to_indices)."""
    return reference.multihot.position_map_from_indices(indices, num_local_experts)
