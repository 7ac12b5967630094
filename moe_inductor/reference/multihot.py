"""Plain-torch reference for top-k indices <-> dense multihot maps (SPEC §1)."""

from __future__ import annotations

import torch

from ._rows import gather_rows, scatter_rows


def _flat_slots(cols: torch.Tensor, width: int) -> torch.Tensor:
    """Flat index `t * width + cols[t, j]` of every entry, -1 where `cols` is outside `[0, width)`."""
    rows = torch.arange(cols.shape[0], device=cols.device, dtype=torch.int64).unsqueeze(1)
    cols = cols.to(torch.int64)
    return torch.where((cols >= 0) & (cols < width), rows * width + cols, -1).reshape(-1)


def indices_to_multihot(indices: torch.Tensor, probs: torch.Tensor, num_local_experts: int):
    """`routing_map[t, e]` / `probs_map[t, e]` from `indices[t, k] == e`; ids outside `[0, L)` are skipped."""
    num_tokens = indices.shape[0]
    slots = _flat_slots(indices, num_local_experts)
    n = num_tokens * num_local_experts
    ones = torch.ones(slots.shape, dtype=torch.bool, device=indices.device)
    routing_map = scatter_rows(ones, slots, n, False).view(num_tokens, num_local_experts)
    probs_map = scatter_rows(probs.reshape(-1), slots, n, 0).view(num_tokens, num_local_experts)
    return routing_map, probs_map


def indices_to_multihot_backward(grad_probs_map: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`grad_probs[t, k] = grad_probs_map[t, indices[t, k]]` for routed entries, 0 for skipped ones."""
    num_local_experts = grad_probs_map.shape[1]
    slots = _flat_slots(indices, num_local_experts)
    return gather_rows(grad_probs_map.reshape(-1), slots).view(indices.shape)


def position_map_from_indices(indices: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """The position map of SPEC §1: `k` at `[t, indices[t, k]]` for routed entries, -1 elsewhere (int64)."""
    num_tokens, topk = indices.shape
    slots = _flat_slots(indices, num_local_experts)
    k = torch.arange(topk, device=indices.device, dtype=torch.int64).repeat(num_tokens)
    return scatter_rows(k, slots, num_tokens * num_local_experts, -1).view(num_tokens, num_local_experts)


def multihot_to_indices(probs_map: torch.Tensor, position_map: torch.Tensor, topk: int) -> torch.Tensor:
    """`probs[t, position_map[t, e]] = probs_map[t, e]` where the position is in `[0, topk)`; 0 elsewhere."""
    num_tokens = probs_map.shape[0]
    slots = _flat_slots(position_map, topk)
    return scatter_rows(probs_map.reshape(-1), slots, num_tokens * topk, 0).view(num_tokens, topk)


def multihot_to_indices_backward(grad_probs: torch.Tensor, position_map: torch.Tensor) -> torch.Tensor:
    """`grad_probs_map[t, e] = grad_probs[t, position_map[t, e]]`, 0 where the position is -1."""
    slots = _flat_slots(position_map, grad_probs.shape[1])
    return gather_rows(grad_probs.reshape(-1), slots).view(position_map.shape)
