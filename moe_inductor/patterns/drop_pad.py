"""Megatron's drop-and-pad permute (per-expert stable argsort cut at the capacity) -> our `permute(drop_and_pad=True)`.

Megatron `moe_utils.permute(..., num_out_tokens, drop_and_pad=True)` gives expert e the rows `[e*C, (e+1)*C)` with
`C = num_out_tokens // E`: its routed tokens in ascending order, then (when it has fewer than C) its lowest
non-routed token ids. Our op defines exactly that order (SPEC §2/§3, `reference.permutation.pad_pairs`), with
`C = min(num_out_tokens // E, T)`, so the rewrite passes `num_out_tokens = C * E` for the `C` the eager code cuts at.
The sizes are static (`E * C` rows): nothing here syncs, before or after.

The pad rows are real token copies with probability `probs[t, e]` (0 in a probs map from top-k); the combine that
pairs with this (`unpermute(..., drop_and_pad=True)`) is in `combine`.
"""

from __future__ import annotations

import torch

from ._rewrite import Rewrite, example_value, same, static_int

_permute = torch.ops.moe_inductor.permute.default


# megatron-core: the token ids of each expert's C slots.
def _drop_pad(tokens, routing_map, capacity, dim):
    routing_map = routing_map.to(torch.int8).T.contiguous()
    sorted_indices = routing_map.argsort(dim=dim, descending=True, stable=True)[:, :capacity].contiguous()
    sorted_indices = sorted_indices.view(-1)
    permuted_input = tokens.index_select(0, sorted_indices)
    return permuted_input, sorted_indices


# ... and the probs of those slots, gathered from the transposed probs map by flat index e*T + token.
def _drop_pad_probs(tokens, routing_map, probs, capacity, dim, num_tokens, num_experts, device):
    routing_map = routing_map.to(torch.int8).T.contiguous()
    sorted_indices = routing_map.argsort(dim=dim, descending=True, stable=True)[:, :capacity].contiguous()
    sorted_indices = sorted_indices.view(-1)
    probs_t_1d = probs.T.contiguous().view(-1)
    indices_dim0 = torch.arange(num_experts, device=device).unsqueeze(-1)
    indices_dim1 = sorted_indices.view(num_experts, capacity)
    indices_1d = (indices_dim0 * num_tokens + indices_dim1).view(-1)
    permuted_probs = probs_t_1d.index_select(0, indices_1d)
    permuted_input = tokens.index_select(0, sorted_indices)
    return permuted_input, permuted_probs, sorted_indices


def _replace(match, tokens, routing_map, capacity, dim, probs=None, **_):
    num_experts = static_int(example_value(match.kwargs["routing_map"]).shape[1])
    if num_experts is None:  # dynamic=True: E is a symbol, read it from the map in the graph
        num_experts = routing_map.size(1)
    out = _permute(tokens, routing_map, probs, capacity * num_experts, True)
    return (out[0], out[2]) if probs is None else (out[0], out[1], out[2])


def _check(match, tokens, routing_map, capacity, dim, probs=None, num_tokens=None, num_experts=None, device=None):
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    x, rmap = example_value(tokens), example_value(routing_map)
    c = example_value(capacity) if isinstance(capacity, torch.fx.Node) else capacity
    # A bool map: argsort of other values (2 > 1 > 0) would order tokens by value, not by routed / not routed.
    ok = x.dim() == 2 and rmap.dim() == 2 and rmap.dtype == torch.bool and dim in (-1, 1)
    ok = ok and isinstance(c, (int, torch.SymInt))
    if probs is not None:
        p = example_value(probs)
        ok = ok and p.dim() == 2 and p.is_floating_point()
        # The flat index e*T + t must address probs[t, e]: T is the probs map's row count, E its width.
        ok = ok and same(num_tokens, p.shape[0], rmap.shape[0]) and same(num_experts, p.shape[1], rmap.shape[1])
    # Our op needs C >= 1 (eager `[:, :0]` gives no rows, ours raises). canonicalize only made the slice a narrow
    # because it provably kept C columns, so C <= T. A symbolic C (capacity from a dynamic T) is guarded.
    return ok and same(x.shape[0], rmap.shape[0]) and guard_or_false(c >= 1)


# `.to(torch.int8)` is left out when the map is already bool, `.contiguous()` by some callers.
_OPTIONAL = (torch.Tensor.contiguous, torch.Tensor.to)

REWRITES = [
    Rewrite("permute_drop_pad_probs", _drop_pad_probs, _replace, _check, _OPTIONAL),
    Rewrite("permute_drop_pad", _drop_pad, _replace, _check, _OPTIONAL),
]
