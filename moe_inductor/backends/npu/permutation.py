"""Routing-map permute / unpermute on torch_npu's fused kernels (the functions of `moe_inductor.reference.permutation`).

torch_npu style (`moe_token_permute_with_routing_map`, `moe_token_unpermute_with_routing_map`): our ops follow the
NPU kernels' conventions, so these calls pass straight through, with the arguments translated:

* `num_out_tokens=None` means T on the NPU and here; we pass the number explicitly anyway.
* The kernels take a bool or int8 routing map, int32 indices, and probs of the tokens' dtype. A uint8 map becomes
  bool and int64 indices int32. Probs of another dtype are not rounded to the tokens' dtype: `permute` gathers them
  with the plain-torch row map, `unpermute` does cast them (the weights of a sum rounded in the tokens' dtype anyway).

Megatron style (`permute`, `unpermute`): same row order, but `sorted_indices` is the FORWARD map (token of each row,
int64) where the NPU's dropless permute returns the INVERSE one, and Megatron accepts any number of routed experts
per token where the NPU kernel needs exactly `num_out_tokens // T`. So:

* drop-and-pad uses the NPU kernels directly (their padded `sorted_indices` is the forward map already);
* dropless permute runs `npu_moe_init_routing_v2` on the routing map seen as `[T, E]` expert ids (routed pair
  `(t, e)` -> id `e`, not routed -> `E + e`): its stable sort by id is exactly Megatron's order (routed pairs expert-
  major, then the non-routed ones, which fill rows past the routed count), for any routing map, and its gather index
  gives the forward map without a host sync;
* dropless unpermute weights the rows by their probs (plain torch) and adds them up with the NPU unpermute in its
  padded form, which is a plain scatter-add by the forward map when no probs are passed.

Backward: torch_npu's grad kernels take arguments our autograd formulas do not keep, so the backward functions are
the plain-torch reference ones, running on the NPU.
"""

from __future__ import annotations

import torch

from ...reference import permutation as ref
from ...reference._rows import scatter_rows
from ...reference.permutation import moe_token_unpermute_backward, permute_backward, unpermute_backward
from ._native import native, torch_npu

__all__ = [
    "moe_token_permute_with_routing_map",
    "moe_token_unpermute_backward",
    "moe_token_unpermute_with_routing_map",
    "permute",
    "permute_backward",
    "unpermute",
    "unpermute_backward",
]


def _npu_routing_map(routing_map):
    """The kernels take bool or int8 maps."""
    if routing_map is None or routing_map.dtype in (torch.bool, torch.int8):
        return routing_map
    return routing_map.bool()


# ---------------------------------------------------------------------------------------------------------------------
# torch_npu style
# ---------------------------------------------------------------------------------------------------------------------


def moe_token_permute_with_routing_map(tokens, routing_map, probs, num_out_tokens, drop_and_pad):
    if not native(tokens, probs):
        return ref.moe_token_permute_with_routing_map(tokens, routing_map, probs, num_out_tokens, drop_and_pad)
    same_dtype = probs is not None and probs.dtype == tokens.dtype
    permuted, permuted_probs, sorted_indices = torch_npu().npu_moe_token_permute_with_routing_map(
        tokens,
        _npu_routing_map(routing_map),
        probs=probs if same_dtype else None,
        num_out_tokens=tokens.shape[0] if num_out_tokens is None else num_out_tokens,
        drop_and_pad=drop_and_pad,
    )
    if probs is not None and not same_dtype:
        pairs = ref.permute_pairs(routing_map, permuted.shape[0], drop_and_pad)
        permuted_probs = ref.pair_probs(probs, pairs)
    return permuted, permuted_probs, sorted_indices


def moe_token_unpermute_with_routing_map(permuted, sorted_indices, restore_shape, probs, routing_map, drop_and_pad):
    if not native(permuted, probs):
        return ref.moe_token_unpermute_with_routing_map(
            permuted, sorted_indices, restore_shape, probs, routing_map, drop_and_pad
        )
    return torch_npu().npu_moe_token_unpermute_with_routing_map(
        permuted,
        sorted_indices.to(torch.int32),
        list(restore_shape),
        probs=probs.to(permuted.dtype) if probs is not None else None,
        routing_map=_npu_routing_map(routing_map),
        drop_and_pad=drop_and_pad,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Megatron style
# ---------------------------------------------------------------------------------------------------------------------


def _megatron_dropless_forward_map(tokens, routing_map, num_rows):
    """(permuted tokens, token of each row) for the first `num_rows` rows of Megatron's dropless order."""
    num_tokens, num_experts = routing_map.shape
    experts = torch.arange(num_experts, device=routing_map.device, dtype=torch.int32)
    expert_idx = torch.where(routing_map.bool(), experts, experts + num_experts)
    permuted, row_of_pair, _, _ = torch_npu().npu_moe_init_routing_v2(
        tokens,
        expert_idx,
        active_num=num_rows,
        expert_num=2 * num_experts,
        # Always passed: the defaults changed across torch_npu releases (quant_mode 0 would quantise to int8), and
        # some releases accept only count mode with the counts output on.
        quant_mode=-1,
        expert_tokens_num_type=1,
        expert_tokens_num_flag=True,
        active_expert_range=[0, 2 * num_experts],
        # Gather form (row of each pair): the one index every release returns in the same form.
        row_idx_type=0,
    )
    pair = torch.arange(num_tokens * num_experts, device=routing_map.device, dtype=torch.int64)
    token_of_row = scatter_rows(pair // num_experts, row_of_pair.to(torch.int64), num_rows, -1)
    return permuted, token_of_row


def permute(tokens, routing_map, probs, num_out_tokens, drop_and_pad):
    num_tokens, num_experts = routing_map.shape
    if not native(tokens, probs) or num_out_tokens == 0 or num_experts == 0:
        return ref.permute(tokens, routing_map, probs, num_out_tokens, drop_and_pad)
    if drop_and_pad and num_out_tokens is not None:
        capacity = ref.megatron_capacity(num_tokens, num_experts, num_out_tokens)
        permuted, permuted_probs, sorted_indices = moe_token_permute_with_routing_map(
            tokens, routing_map, probs, num_experts * capacity, True
        )
        return permuted, permuted_probs, sorted_indices.to(torch.int64)
    # Megatron's masked_select form syncs once for its row count; so do we.
    num_rows = int(routing_map.bool().sum()) if num_out_tokens is None else num_out_tokens
    if num_rows == 0:
        return ref.permute(tokens, routing_map, probs, num_rows, False)
    permuted, token_of_row = _megatron_dropless_forward_map(tokens, routing_map, num_rows)
    permuted_probs = None
    if probs is not None:
        permuted_probs = ref.pair_probs(probs, ref.dropless_pairs(routing_map, num_rows))
    return permuted, permuted_probs, token_of_row


def unpermute(permuted, sorted_indices, restore_shape, probs, routing_map, drop_and_pad):
    if not native(permuted, probs):
        return ref.unpermute(permuted, sorted_indices, restore_shape, probs, routing_map, drop_and_pad)
    if drop_and_pad:
        return moe_token_unpermute_with_routing_map(permuted, sorted_indices, restore_shape, probs, None, True)
    rows = permuted
    if probs is not None:
        weights = ref.pair_probs(probs, ref.dropless_pairs(routing_map, sorted_indices.shape[0]))
        rows = (permuted.float() * weights.float().unsqueeze(-1)).to(permuted.dtype)
    # The padded form without probs is `out[sorted_indices[r]] += rows[r]`: exactly Megatron's scatter-add.
    return moe_token_unpermute_with_routing_map(rows, sorted_indices, restore_shape, None, None, True)
