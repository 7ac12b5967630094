"""Eager MoE routing code as users run it today, transcribed literally.

Megatron-LM `moe_utils.permute` / `unpermute` (non-fused paths) in both forms it has shipped: the masked_select
dropless path (megatron-core <= 0.16) and the fixed-shape argsort path of later releases. They are the oracles of
the exactness tests (our ops must return the same rows in the same order), the eager baselines of the benchmarks,
and the source of the pattern rewrites' search forms. Keep them literal: do not "fix" or speed them up.
"""

from __future__ import annotations

import torch


def megatron_permute_masked_select(tokens, routing_map, probs=None, num_out_tokens=None, drop_and_pad=False):
    """megatron-core <= 0.16: dropless by masked_select; drop-and-pad by per-expert argsort."""
    num_tokens, hidden = tokens.shape
    num_experts = routing_map.shape[1]
    permuted_probs = None
    if drop_and_pad and not (num_out_tokens is None):
        capacity = num_out_tokens // num_experts
        routing_map = routing_map.to(dtype=torch.int8).T.contiguous()
        sorted_indices = routing_map.argsort(dim=-1, descending=True, stable=True)[:, :capacity].contiguous()
        sorted_indices = sorted_indices.view(-1)
        if probs is not None:
            probs_T_1D = probs.T.contiguous().view(-1)
            indices_dim0 = torch.arange(num_experts, device=routing_map.device).unsqueeze(-1)
            indices_dim1 = sorted_indices.view(num_experts, capacity)
            indices_1D = (indices_dim0 * num_tokens + indices_dim1).view(-1)
            permuted_probs = probs_T_1D.index_select(0, indices_1D)
    else:
        routing_map = routing_map.bool().T.contiguous()
        token_indices = torch.arange(num_tokens, device=routing_map.device).unsqueeze(0).expand(num_experts, -1)
        sorted_indices = token_indices.masked_select(routing_map)
        if probs is not None:
            permuted_probs = probs.T.contiguous().masked_select(routing_map)
    permuted_input = tokens.index_select(0, sorted_indices)
    return permuted_input, permuted_probs, sorted_indices


def megatron_permute_argsort(tokens, routing_map, probs=None, num_out_tokens=None, drop_and_pad=False):
    """Newer megatron-core: the dropless path is a fixed-shape argsort cut at num_out_tokens."""
    if drop_and_pad and num_out_tokens is not None:
        return megatron_permute_masked_select(tokens, routing_map, probs, num_out_tokens, drop_and_pad)
    num_tokens = tokens.shape[0]
    permuted_probs = None
    routing_map = routing_map.bool().T.contiguous()
    flat_sorted = routing_map.reshape(-1).argsort(descending=True, stable=True)
    flat_sorted = flat_sorted[:num_out_tokens]
    sorted_indices = flat_sorted % num_tokens
    if probs is not None:
        permuted_probs = probs.T.contiguous().reshape(-1)[flat_sorted]
    permuted_input = tokens.index_select(0, sorted_indices)
    return permuted_input, permuted_probs, sorted_indices


def megatron_unpermute(permuted_tokens, sorted_indices, restore_shape, probs=None, routing_map=None, drop_and_pad=False):
    _, hidden = restore_shape
    input_dtype = permuted_tokens.dtype
    if probs is not None:
        assert routing_map is not None, "Mask must be provided to permute the probs."
        if drop_and_pad:
            num_experts = routing_map.size(1)
            num_permuted_tokens = sorted_indices.size(0)
            capacity = num_permuted_tokens // num_experts
            num_unpermuted_tokens = probs.size(0)
            probs_T_1D = probs.T.contiguous().view(-1)
            indices_dim0 = torch.arange(num_experts, device=routing_map.device).unsqueeze(-1)
            indices_dim1 = sorted_indices.view(num_experts, capacity)
            indices_1D = (indices_dim0 * num_unpermuted_tokens + indices_dim1).view(-1)
            permuted_probs = probs_T_1D.index_select(0, indices_1D)
        else:
            permuted_probs = probs.T.contiguous().masked_select(routing_map.T.contiguous())
        permuted_tokens = permuted_tokens * permuted_probs.unsqueeze(-1)
    output_tokens = torch.zeros(restore_shape, dtype=permuted_tokens.dtype, device=permuted_tokens.device)
    output_tokens.scatter_add_(0, sorted_indices.unsqueeze(1).expand(-1, hidden), permuted_tokens)
    return output_tokens.to(dtype=input_dtype)
