"""Combine: scatter/index-add of expert rows back to their tokens, or a gather-weight-sum -> our `unpermute` /
`moe_finalize_routing` (fp32 accumulation, one store, no atomics)."""

from __future__ import annotations

import torch

from ._rewrite import Rewrite, example_value, same, static_int

_unpermute = torch.ops.moe_inductor.unpermute.default
_finalize = torch.ops.moe_inductor.moe_finalize_routing.default


# Megatron `unpermute` with probs (dropless): weight each row by its prob, scatter-add rows to their tokens.
def _scatter_add_probs(
    permuted_tokens, sorted_indices, probs, routing_map, restore_shape, hidden, dtype, device, out_dtype
):
    permuted_probs = probs.T.contiguous().masked_select(routing_map.T.contiguous())
    permuted_tokens = permuted_tokens * permuted_probs.unsqueeze(-1)
    output_tokens = torch.zeros(restore_shape, dtype=dtype, device=device)
    output_tokens.scatter_add_(0, sorted_indices.unsqueeze(1).expand(-1, hidden), permuted_tokens)
    return output_tokens.to(out_dtype)


def _scatter_add_probs_replace(
    match, permuted_tokens, sorted_indices, probs, routing_map, restore_shape, hidden, dtype, device, out_dtype
):
    return _unpermute(permuted_tokens, sorted_indices, _as_list(restore_shape), probs, routing_map, False).to(out_dtype)


def _scatter_add_probs_check(
    match, permuted_tokens, sorted_indices, probs, routing_map, restore_shape, hidden, dtype, device, out_dtype
):
    y, p, rmap = example_value(permuted_tokens), example_value(probs), example_value(routing_map)
    ok = (
        _rows_check(y, sorted_indices, restore_shape, hidden)
        and rmap.dtype == torch.bool
        and same(p.shape[0], rmap.shape[0])
        and same(p.shape[1], rmap.shape[1])
    )
    # Ours returns the tokens' dtype; the eager sum is in the promoted dtype and then cast to out_dtype.
    return ok and dtype == torch.promote_types(y.dtype, p.dtype) and same(rmap.shape[0], _shape(restore_shape)[0])


# Megatron `unpermute(..., drop_and_pad=True)` with probs: slot s belongs to expert s // C and is weighted by
# probs[token(s), expert], gathered from the transposed probs map by flat index e*T + token.
def _scatter_add_probs_pad(
    permuted_tokens, sorted_indices, probs, restore_shape, hidden, num_experts, capacity, num_tokens, dtype, device,
    out_dtype,
):  # fmt: skip
    probs_t_1d = probs.T.contiguous().view(-1)
    indices_dim0 = torch.arange(num_experts, device=device).unsqueeze(-1)
    indices_dim1 = sorted_indices.view(num_experts, capacity)
    indices_1d = (indices_dim0 * num_tokens + indices_dim1).view(-1)
    permuted_probs = probs_t_1d.index_select(0, indices_1d)
    permuted_tokens = permuted_tokens * permuted_probs.unsqueeze(-1)
    output_tokens = torch.zeros(restore_shape, dtype=dtype, device=device)
    output_tokens.scatter_add_(0, sorted_indices.unsqueeze(1).expand(-1, hidden), permuted_tokens)
    return output_tokens.to(out_dtype)


def _scatter_add_probs_pad_replace(match, permuted_tokens, sorted_indices, probs, restore_shape, out_dtype, **_):
    # The pad combine reads each slot's expert from its position; it needs no routing map.
    return _unpermute(permuted_tokens, sorted_indices, _as_list(restore_shape), probs, None, True).to(out_dtype)


def _scatter_add_probs_pad_check(
    match, permuted_tokens, sorted_indices, probs, restore_shape, hidden, num_experts, capacity, num_tokens, dtype,
    device, out_dtype,
):  # fmt: skip
    y, p = example_value(permuted_tokens), example_value(probs)
    ok = _rows_check(y, sorted_indices, restore_shape, hidden) and p.dim() == 2
    ok = ok and dtype == torch.promote_types(y.dtype, p.dtype)
    # e*T + token must address probs[token, e]: T and E are the probs map's, and T is the restored token count.
    return ok and same(num_tokens, p.shape[0], _shape(restore_shape)[0]) and same(num_experts, p.shape[1])


# Megatron `unpermute` without probs, and any "sum rows into their tokens" by scatter_add_ or index_add_.
def _scatter_add(permuted_tokens, sorted_indices, restore_shape, hidden, dtype, device, out_dtype):
    output_tokens = torch.zeros(restore_shape, dtype=dtype, device=device)
    output_tokens.scatter_add_(0, sorted_indices.unsqueeze(1).expand(-1, hidden), permuted_tokens)
    return output_tokens.to(out_dtype)


def _index_add(permuted_tokens, sorted_indices, restore_shape, dtype, device):
    return torch.zeros(restore_shape, dtype=dtype, device=device).index_add_(0, sorted_indices, permuted_tokens)


# torchtitan: rows summed into a zeros_like of the (flattened) input by the expanded token index.
def _scatter_add_like(permuted_tokens, sorted_indices, like, hidden):
    return torch.zeros_like(like).scatter_add(0, sorted_indices.unsqueeze(1).expand(-1, hidden), permuted_tokens)


def _scatter_add_like_replace(match, permuted_tokens, sorted_indices, like, hidden):
    shape = example_value(match.kwargs["like"]).shape
    restore_shape = [static_int(n) if static_int(n) is not None else like.size(i) for i, n in enumerate(shape)]
    return _unpermute(permuted_tokens, sorted_indices, restore_shape, None, None, False)


def _scatter_add_like_check(match, permuted_tokens, sorted_indices, like, hidden):
    y, out = example_value(permuted_tokens), example_value(like)
    return out.dim() == 2 and out.dtype == y.dtype and _rows_check(y, sorted_indices, tuple(out.shape), hidden)


def _scatter_add_replace(match, permuted_tokens, sorted_indices, restore_shape, hidden, dtype, device, out_dtype):
    return _unpermute(permuted_tokens, sorted_indices, _as_list(restore_shape), None, None, False).to(out_dtype)


def _index_add_replace(match, permuted_tokens, sorted_indices, restore_shape, dtype, device):
    return _unpermute(permuted_tokens, sorted_indices, _as_list(restore_shape), None, None, False)


def _scatter_add_check(match, permuted_tokens, sorted_indices, restore_shape, hidden, dtype, device, out_dtype):
    y = example_value(permuted_tokens)
    return _rows_check(y, sorted_indices, restore_shape, hidden) and dtype == y.dtype


def _index_add_check(match, permuted_tokens, sorted_indices, restore_shape, dtype, device):
    y = example_value(permuted_tokens)
    return _rows_check(y, sorted_indices, restore_shape, y.shape[1]) and dtype == y.dtype


def _shape(restore_shape):
    """A captured shape: a literal tuple, or a node (`x.size()` under dynamic shapes)."""
    return example_value(restore_shape) if isinstance(restore_shape, torch.fx.Node) else restore_shape


def _as_list(restore_shape):
    return restore_shape if isinstance(restore_shape, torch.fx.Proxy) else list(restore_shape)


def _rows_check(y, sorted_indices, restore_shape, hidden) -> bool:
    restore_shape = _shape(restore_shape)
    idx = example_value(sorted_indices)
    return (
        y.dim() == 2
        and idx.dim() == 1
        and idx.dtype == torch.int64
        and same(idx.shape[0], y.shape[0])
        and len(restore_shape) == 2
        and same(restore_shape[1], hidden, y.shape[1])
    )


# Gather each token's K rows (row of pair (t, k) at rows[t*K + k]), weight, sum: vLLM / HF style references.
def _gather_weight_sum(expert_out, rows, weights, num_tokens, topk, hidden):
    return (expert_out[rows].view(num_tokens, topk, hidden) * weights[..., None]).sum(1)


def _gather_weight_sum_replace(match, expert_out, rows, weights, num_tokens, topk, hidden):
    # Mode 2 reads the row of pair (t, k) at rows[t*K + k], the eager layout.
    out = _finalize(expert_out, None, None, None, weights, rows, None, 2, static_int(topk))
    y, w = (example_value(match.kwargs[name]) for name in ("expert_out", "weights"))
    return out.to(torch.promote_types(y.dtype, w.dtype))


def _gather_weight_sum_check(match, expert_out, rows, weights, num_tokens, topk, hidden):
    y, r, w = example_value(expert_out), example_value(rows), example_value(weights)
    return (
        y.dim() == 2
        and r.dim() == 1
        and r.dtype in (torch.int32, torch.int64)
        and w.dim() == 2
        and same(w.shape[0], num_tokens)
        and static_int(topk) == w.shape[1]
        and same(r.shape[0], w.shape[0] * w.shape[1])
        and same(hidden, y.shape[1])
    )


REWRITES = [
    Rewrite(
        "combine_scatter_add_probs_pad",
        _scatter_add_probs_pad,
        _scatter_add_probs_pad_replace,
        _scatter_add_probs_pad_check,
    ),
    Rewrite("combine_scatter_add_probs", _scatter_add_probs, _scatter_add_probs_replace, _scatter_add_probs_check),
    Rewrite("combine_scatter_add", _scatter_add, _scatter_add_replace, _scatter_add_check),
    Rewrite("combine_scatter_add_zeros_like", _scatter_add_like, _scatter_add_like_replace, _scatter_add_like_check),
    Rewrite("combine_index_add", _index_add, _index_add_replace, _index_add_check),
    Rewrite("combine_gather_weight_sum", _gather_weight_sum, _gather_weight_sum_replace, _gather_weight_sum_check),
]
