"""Megatron's permute by routing map (dropless: masked_select or fixed-shape argsort) -> our `permute`."""

from __future__ import annotations

import torch

from ._rewrite import Rewrite, example_value, same
from .multihot import topk_experts_per_row

_permute = torch.ops.moe_inductor.permute.default


# megatron-core <= 0.16, dropless: token ids by masked_select over the transposed map.
def _masked_select(tokens, routing_map, num_tokens, num_experts, device):
    routing_map = routing_map.bool().T.contiguous()
    token_indices = torch.arange(num_tokens, device=device).unsqueeze(0).expand(num_experts, -1)
    sorted_indices = token_indices.masked_select(routing_map)
    permuted_input = tokens.index_select(0, sorted_indices)
    return permuted_input, sorted_indices


def _masked_select_probs(tokens, routing_map, probs, num_tokens, num_experts, device):
    routing_map = routing_map.bool().T.contiguous()
    token_indices = torch.arange(num_tokens, device=device).unsqueeze(0).expand(num_experts, -1)
    sorted_indices = token_indices.masked_select(routing_map)
    permuted_probs = probs.T.contiguous().masked_select(routing_map)
    permuted_input = tokens.index_select(0, sorted_indices)
    return permuted_input, permuted_probs, sorted_indices


def _masked_select_replace(match, tokens, routing_map, num_tokens, num_experts, device, probs=None):
    # Sync elimination: a top-k routing map has exactly K experts per token, so the row count is T*K.
    k = topk_experts_per_row(routing_map)
    num_out_tokens = None if k is None else num_tokens * k
    out = _permute(tokens, routing_map, probs, num_out_tokens, False)
    return (out[0], out[2]) if probs is None else (out[0], out[1], out[2])


def _masked_select_check(match, tokens, routing_map, num_tokens, num_experts, device, probs=None):
    x, rmap = example_value(tokens), example_value(routing_map)
    ok = x.dim() == 2 and rmap.dim() == 2 and rmap.dtype == torch.bool
    # arange(T).expand(E, -1) must be exactly [E, T] (a broadcast of a shorter arange gives other ids).
    ok = ok and same(num_tokens, rmap.shape[0], x.shape[0]) and same(num_experts, rmap.shape[1])
    if probs is not None:
        ok = ok and same(*example_value(probs).shape[:1], rmap.shape[0]) and example_value(probs).dim() == 2
    return ok


# Later megatron-core, dropless: a fixed-shape stable argsort of the flattened map, cut at num_out_tokens.
def _argsort(tokens, routing_map, num_tokens, num_out_tokens):
    routing_map = routing_map.bool().T.contiguous()
    flat_sorted = routing_map.reshape(-1).argsort(descending=True, stable=True)
    flat_sorted = flat_sorted[:num_out_tokens]
    sorted_indices = flat_sorted % num_tokens
    permuted_input = tokens.index_select(0, sorted_indices)
    return permuted_input, sorted_indices


def _argsort_probs(tokens, routing_map, probs, num_tokens, num_out_tokens):
    routing_map = routing_map.bool().T.contiguous()
    flat_sorted = routing_map.reshape(-1).argsort(descending=True, stable=True)
    flat_sorted = flat_sorted[:num_out_tokens]
    sorted_indices = flat_sorted % num_tokens
    permuted_probs = probs.T.contiguous().reshape(-1).index_select(0, flat_sorted)
    permuted_input = tokens.index_select(0, sorted_indices)
    return permuted_input, permuted_probs, sorted_indices


def _argsort_replace(match, tokens, routing_map, num_tokens, num_out_tokens, probs=None):
    out = _permute(tokens, routing_map, probs, num_out_tokens, False)
    return (out[0], out[2]) if probs is None else (out[0], out[1], out[2])


def _argsort_check(match, tokens, routing_map, num_tokens, num_out_tokens, probs=None):
    x, rmap = example_value(tokens), example_value(routing_map)
    ok = x.dim() == 2 and rmap.dim() == 2 and rmap.dtype == torch.bool
    ok = ok and same(num_tokens, rmap.shape[0], x.shape[0])
    if probs is not None:
        ok = ok and same(*example_value(probs).shape[:1], rmap.shape[0]) and example_value(probs).dim() == 2
    # Past the routed pairs the argsort continues into unrouted (token, expert) pairs; ours stops there. Equal when
    # the cut is exactly the routed count, which a top-k map proves.
    k = topk_experts_per_row(routing_map)
    return ok and k is not None and same(num_out_tokens, rmap.shape[0] * k)


# Variants without `.bool()` (the map is already bool) or without `.contiguous()` come from `optional`.
_OPTIONAL = (torch.Tensor.contiguous, torch.Tensor.to)

REWRITES = [
    Rewrite(
        "permute_masked_select_probs", _masked_select_probs, _masked_select_replace, _masked_select_check, _OPTIONAL
    ),
    Rewrite("permute_masked_select", _masked_select, _masked_select_replace, _masked_select_check, _OPTIONAL),
    Rewrite("permute_argsort_probs", _argsort_probs, _argsort_replace, _argsort_check, _OPTIONAL),
    Rewrite("permute_argsort", _argsort, _argsort_replace, _argsort_check, _OPTIONAL),
]
