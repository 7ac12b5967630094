"""Plain-torch reference for routing-map permute / unpermute (SPEC §2, §2b, §3).

Every permuted row is tied to one *pair* `(expert e, token t)`, stored as the flat expert-major index `e * T + t`
(-1: no pair). The pairs of a permute are its row map: the token of row r is `pairs[r] % T`, its prob is
`probs[t, e]`. Both conventions the ops expose are derived from it:

* Megatron's `sorted_indices` is the forward map (token of each row);
* torch_npu's dropless `sorted_indices` is the inverse map: for the j-th routed expert of token t (experts
  ascending), `sorted_indices[t * K + j]` is the row that holds the copy.

Row order, dropless: a stable sort of `routing_map.T.flatten()` that puts routed pairs first, i.e. expert-major
with ascending token ids, and rows past the routed count take the first non-routed pairs (what Megatron's
`argsort(descending=True, stable=True)[:num_out_tokens]` does). Drop-and-pad: per expert, the same sort cut at the
capacity C. Both are computed with prefix sums, not a sort.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

from ._rows import acc_dtype, gather_rows, invert_rank, scatter_add_rows, scatter_rows, true_first_rank

# ---------------------------------------------------------------------------------------------------------------------
# Geometry: how many rows an op produces. Pure int (or SymInt) math, shared with the fake kernels.
# ---------------------------------------------------------------------------------------------------------------------


def npu_topk(num_tokens, num_out_tokens):
    """K of a dropless torch_npu-style permute: `num_out_tokens // T` (`None` means T, i.e. K = 1)."""
    if num_out_tokens is None:
        return 1
    if guard_or_false(num_tokens == 0):
        return 0
    return num_out_tokens // num_tokens


def npu_capacity(num_tokens, num_experts, num_out_tokens):
    """Per-expert rows of a torch_npu-style drop-and-pad permute: `num_out_tokens // E` (`None` means T)."""
    return (num_tokens if num_out_tokens is None else num_out_tokens) // torch.sym_max(num_experts, 1)


def megatron_capacity(num_tokens, num_experts, num_out_tokens):
    """Per-expert rows of a Megatron drop-and-pad permute. Megatron keeps `argsort(...)[:, :C]`, so at most T."""
    return torch.sym_min(num_out_tokens // num_experts, num_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Row maps
# ---------------------------------------------------------------------------------------------------------------------


def dropless_rank(routing_map: torch.Tensor) -> torch.Tensor:
    """Row of every pair in the dropless order, indexed by the pair's flat expert-major index `e * T + t`."""
    return true_first_rank(routing_map.bool().t().reshape(-1))


def dropless_pairs(routing_map: torch.Tensor, num_rows) -> torch.Tensor:
    """Pair of each of the first `num_rows` dropless rows (-1 past the `T * E` pairs that exist)."""
    return invert_rank(dropless_rank(routing_map), num_rows)


def pad_pairs(routing_map: torch.Tensor, capacity) -> torch.Tensor:
    """Pair of each of the `E * capacity` drop-and-pad rows: expert e owns rows `[e*C, (e+1)*C)`."""
    num_tokens, num_experts = routing_map.shape
    device = routing_map.device
    rank = true_first_rank(routing_map.bool().t(), dim=1)  # [E, T]
    experts = torch.arange(num_experts, device=device, dtype=torch.int64).unsqueeze(1)
    tokens = torch.arange(num_tokens, device=device, dtype=torch.int64).unsqueeze(0)
    slot = torch.where(rank < capacity, experts * capacity + rank, -1)
    pair = experts * num_tokens + tokens
    return scatter_rows(pair.reshape(-1), slot.reshape(-1), num_experts * capacity, -1)


def pad_pairs_from_tokens(token_of_slot: torch.Tensor, num_tokens, num_experts) -> torch.Tensor:
    """Pairs of drop-and-pad rows given their tokens (Megatron's / torch_npu's forward `sorted_indices`)."""
    capacity = torch.sym_max(token_of_slot.shape[0] // num_experts, 1)
    tokens = token_of_slot.to(torch.int64)
    expert = torch.arange(tokens.shape[0], device=tokens.device, dtype=torch.int64) // capacity
    return torch.where((tokens >= 0) & (tokens < num_tokens), expert * num_tokens + tokens, -1)


def pair_tokens(pairs: torch.Tensor, num_tokens) -> torch.Tensor:
    """Token of every pair (-1 stays -1)."""
    return torch.where(pairs >= 0, pairs.remainder(torch.sym_max(num_tokens, 1)), -1)


def token_major(pairs: torch.Tensor, num_tokens, num_experts) -> torch.Tensor:
    """Pairs re-indexed into a row-major `[T, E]` tensor: `t * E + e` (-1 stays -1)."""
    t = pairs.remainder(torch.sym_max(num_tokens, 1))
    e = pairs.div(torch.sym_max(num_tokens, 1), rounding_mode="floor")
    return torch.where(pairs >= 0, t * num_experts + e, -1)


def pair_probs(probs: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """`probs[t, e]` of every pair, 0 for -1."""
    num_tokens, num_experts = probs.shape
    return gather_rows(probs.reshape(-1), token_major(pairs, num_tokens, num_experts))


def routed_experts(routing_map: torch.Tensor, topk) -> torch.Tensor:
    """`[T, K]`: the routed experts of each token in ascending order, -1 where a row has fewer than K."""
    num_tokens, num_experts = routing_map.shape
    routed = routing_map.bool()
    j = routed.to(torch.int64).cumsum(1) - 1
    tokens = torch.arange(num_tokens, device=routing_map.device, dtype=torch.int64).unsqueeze(1)
    slot = torch.where(routed & (j < topk), tokens * topk + j, -1)
    experts = torch.arange(num_experts, device=routing_map.device, dtype=torch.int64).expand(num_tokens, num_experts)
    return scatter_rows(experts.reshape(-1), slot.reshape(-1), num_tokens * topk, -1).view(num_tokens, topk)


def topk_inverse_map(routing_map: torch.Tensor, rank: torch.Tensor, num_rows, topk) -> torch.Tensor:
    """torch_npu's dropless `sorted_indices`: row of the copy for the j-th routed expert of token t, at `t*K + j`.

    Copies that fall past `num_rows`, and slots of tokens with fewer than K routed experts, are -1.
    """
    num_tokens, num_experts = routing_map.shape
    routed = routing_map.bool()
    j = routed.to(torch.int64).cumsum(1) - 1
    row = rank.view(num_experts, num_tokens).t()
    tokens = torch.arange(num_tokens, device=routing_map.device, dtype=torch.int64).unsqueeze(1)
    slot = torch.where(routed & (j < topk) & (row < num_rows), tokens * topk + j, -1)
    return scatter_rows(row.reshape(-1), slot.reshape(-1), num_tokens * topk, -1)


def inverse_to_rows(inverse: torch.Tensor, routing_map: Optional[torch.Tensor], num_tokens, topk, num_rows):
    """From a torch_npu dropless inverse map to the row maps of its rows: (destination token, pair).

    The pairs need the routing map (they name each row's expert) and are None without it.
    """
    inverse = inverse.to(torch.int64)
    entry = torch.arange(inverse.shape[0], device=inverse.device, dtype=torch.int64)
    token = entry // torch.sym_max(topk, 1)
    dest = scatter_rows(token, inverse, num_rows, -1)
    if routing_map is None:
        return dest, None
    expert = routed_experts(routing_map, topk).reshape(-1)
    pair = torch.where(expert >= 0, expert * num_tokens + token, -1)
    return dest, scatter_rows(pair, inverse, num_rows, -1)


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch (permute) and combine (unpermute) over a row map, with their gradients
# ---------------------------------------------------------------------------------------------------------------------


def dispatch(tokens: torch.Tensor, probs: Optional[torch.Tensor], pairs: torch.Tensor):
    """`permuted[r] = tokens[token(r)]`, `permuted_probs[r] = probs[token(r), expert(r)]`."""
    permuted = gather_rows(tokens, pair_tokens(pairs, tokens.shape[0]))
    permuted_probs = pair_probs(probs, pairs) if probs is not None else None
    return permuted, permuted_probs


def dispatch_backward(grad_permuted, grad_permuted_probs, pairs, num_tokens, num_experts):
    """Grad of `dispatch`: each token sums the grads of its copies; each routed prob gets its row's grad."""
    grad_tokens = None
    if grad_permuted is not None:
        acc = acc_dtype(grad_permuted.dtype)
        rows = pair_tokens(pairs, num_tokens)
        grad_tokens = scatter_add_rows(grad_permuted.to(acc), rows, num_tokens).to(grad_permuted.dtype)
    grad_probs = None
    if grad_permuted_probs is not None:
        acc = acc_dtype(grad_permuted_probs.dtype)
        slots = token_major(pairs, num_tokens, num_experts)
        grad_probs = scatter_add_rows(grad_permuted_probs.to(acc), slots, num_tokens * num_experts)
        grad_probs = grad_probs.view(num_tokens, num_experts).to(grad_permuted_probs.dtype)
    return grad_tokens, grad_probs


def combine(permuted: torch.Tensor, dest: torch.Tensor, weights: Optional[torch.Tensor], num_tokens) -> torch.Tensor:
    """`out[dest[r]] += permuted[r] * weights[r]`: float32 accumulation, one rounding, rows in ascending order."""
    acc = acc_dtype(permuted.dtype)
    values = permuted.to(acc)
    if weights is not None:
        values = values * weights.to(acc).unsqueeze(-1)
    return scatter_add_rows(values, dest, num_tokens).to(permuted.dtype)


def combine_backward(grad_out, permuted, dest, weights, need_weights_grad: bool):
    """Grad of `combine`: `grad_permuted[r] = grad_out[dest[r]] * w[r]`; `grad_w[r] = <grad_out[dest[r]], permuted[r]>`
    (only when `need_weights_grad`)."""
    acc = acc_dtype(permuted.dtype)
    grad_rows = gather_rows(grad_out, dest).to(acc)
    grad_permuted = grad_rows if weights is None else grad_rows * weights.to(acc).unsqueeze(-1)
    grad_weights = (grad_rows * permuted.to(acc)).sum(-1) if need_weights_grad else None
    return grad_permuted.to(permuted.dtype), grad_weights


def scatter_pair_grads(grad_weights: torch.Tensor, pairs: torch.Tensor, num_tokens, num_experts, dtype):
    """Dense `[T, E]` gradient of `probs` from per-row gradients of the probs looked up by `pairs`."""
    slots = token_major(pairs, num_tokens, num_experts)
    grad = scatter_add_rows(grad_weights, slots, num_tokens * num_experts)
    return grad.view(num_tokens, num_experts).to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------------------------------


def permute_pairs(routing_map: torch.Tensor, num_rows, drop_and_pad: bool) -> torch.Tensor:
    """Row map of a permute (either style) that produced `num_rows` rows; what its backward recomputes."""
    if drop_and_pad:
        return pad_pairs(routing_map, num_rows // torch.sym_max(routing_map.shape[1], 1))
    return dropless_pairs(routing_map, num_rows)


def moe_token_permute_with_routing_map(tokens, routing_map, probs, num_out_tokens, drop_and_pad):
    num_tokens, num_experts = routing_map.shape
    if drop_and_pad:
        pairs = pad_pairs(routing_map, npu_capacity(num_tokens, num_experts, num_out_tokens))
        sorted_indices = pair_tokens(pairs, num_tokens)
    else:
        topk = npu_topk(num_tokens, num_out_tokens)
        rank = dropless_rank(routing_map)
        pairs = invert_rank(rank, num_tokens * topk)
        sorted_indices = topk_inverse_map(routing_map, rank, num_tokens * topk, topk)
    permuted, permuted_probs = dispatch(tokens, probs, pairs)
    return permuted, permuted_probs, sorted_indices.to(torch.int32)


def moe_token_unpermute_rows(sorted_indices, routing_map, probs, num_tokens, num_rows, drop_and_pad):
    """(destination token, pair) of every permuted row of a torch_npu-style unpermute."""
    if drop_and_pad:
        dest = sorted_indices.to(torch.int64)
        pairs = None
        if probs is not None:
            pairs = pad_pairs_from_tokens(sorted_indices, num_tokens, probs.shape[1])
        return dest, pairs
    topk = npu_topk(num_tokens, sorted_indices.shape[0])
    return inverse_to_rows(sorted_indices, routing_map if probs is not None else None, num_tokens, topk, num_rows)


def moe_token_unpermute_with_routing_map(permuted, sorted_indices, restore_shape, probs, routing_map, drop_and_pad):
    num_tokens = restore_shape[0]
    dest, pairs = moe_token_unpermute_rows(
        sorted_indices, routing_map, probs, num_tokens, permuted.shape[0], drop_and_pad
    )
    weights = pair_probs(probs, pairs) if probs is not None else None
    return combine(permuted, dest, weights, num_tokens)


def permute(tokens, routing_map, probs, num_out_tokens, drop_and_pad):
    num_tokens, num_experts = routing_map.shape
    if drop_and_pad and num_out_tokens is not None:
        pairs = pad_pairs(routing_map, megatron_capacity(num_tokens, num_experts, num_out_tokens))
    else:
        # Megatron's masked_select form when num_out_tokens is None (a host sync, like Megatron's own code);
        # its argsort(...)[:num_out_tokens] form otherwise.
        num_rows = int(routing_map.bool().sum()) if num_out_tokens is None else num_out_tokens
        pairs = dropless_pairs(routing_map, num_rows)
    permuted, permuted_probs = dispatch(tokens, probs, pairs)
    return permuted, permuted_probs, pair_tokens(pairs, num_tokens)


def unpermute_rows(sorted_indices, routing_map, probs, num_tokens, drop_and_pad):
    """(destination token, pair) of every permuted row of a Megatron-style unpermute."""
    dest = sorted_indices.to(torch.int64)
    if probs is None:
        return dest, None
    if drop_and_pad:
        return dest, pad_pairs_from_tokens(sorted_indices, num_tokens, probs.shape[1])
    return dest, dropless_pairs(routing_map, sorted_indices.shape[0])


def unpermute(permuted, sorted_indices, restore_shape, probs, routing_map, drop_and_pad):
    num_tokens = restore_shape[0]
    dest, pairs = unpermute_rows(sorted_indices, routing_map, probs, num_tokens, drop_and_pad)
    weights = pair_probs(probs, pairs) if probs is not None else None
    return combine(permuted, dest, weights, num_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Backward of the ops (the same functions exist in moe_inductor.kernels.permutation)
# ---------------------------------------------------------------------------------------------------------------------


def permute_backward(grad_permuted, grad_permuted_probs, routing_map, num_rows, drop_and_pad: bool):
    """(grad tokens, grad probs) of either permute that produced `num_rows` rows; None in, None out."""
    num_tokens, num_experts = routing_map.shape
    pairs = permute_pairs(routing_map, num_rows, drop_and_pad)
    return dispatch_backward(grad_permuted, grad_permuted_probs, pairs, num_tokens, num_experts)


def _unpermute_backward(grad_out, permuted, dest, pairs, probs, need_probs_grad: bool):
    weights = pair_probs(probs, pairs) if probs is not None else None
    grad_permuted, grad_weights = combine_backward(grad_out, permuted, dest, weights, need_probs_grad)
    grad_probs = None
    if need_probs_grad:
        grad_probs = scatter_pair_grads(grad_weights, pairs, grad_out.shape[0], probs.shape[1], probs.dtype)
    return grad_permuted, grad_probs


def moe_token_unpermute_backward(grad_out, permuted, sorted_indices, probs, routing_map, drop_and_pad, need_probs):
    """(grad permuted, grad probs) of `moe_token_unpermute_with_routing_map`."""
    dest, pairs = moe_token_unpermute_rows(
        sorted_indices, routing_map, probs, grad_out.shape[0], permuted.shape[0], drop_and_pad
    )
    return _unpermute_backward(grad_out, permuted, dest, pairs, probs, need_probs)


def unpermute_backward(grad_out, permuted, sorted_indices, probs, routing_map, drop_and_pad, need_probs):
    """(grad permuted, grad probs) of Megatron-style `unpermute`."""
    dest, pairs = unpermute_rows(sorted_indices, routing_map, probs, grad_out.shape[0], drop_and_pad)
    return _unpermute_backward(grad_out, permuted, dest, pairs, probs, need_probs)
