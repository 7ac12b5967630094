"""Plain-torch reference for sort-based init routing and its combine (SPEC §4, §4b; torch_npu semantics).

Flat index `j = t * K + k` names one copy of a token. Copies whose expert lies in the active range `[s, e)` are
ordered by expert id, stably (`order`); the rest sort to the tail and get no row. Output row `i` (dropless) or slot
`e * C + rank` (drop/pad) holds `x[order[i] // K]`. Everything the backward needs is in `expanded_row_idx`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

from ._rows import acc_dtype, gather_rows, scatter_add_rows, scatter_rows, valid_rows

DROPLESS, DROP_PAD = 0, 1
GATHER_ROW_IDX, SCATTER_ROW_IDX = 0, 1
NO_QUANT, STATIC_QUANT, DYNAMIC_QUANT = -1, 0, 1
CUMSUM, COUNT, KEY_VALUE = 0, 1, 2

# ---------------------------------------------------------------------------------------------------------------------
# Geometry shared with the fake kernel
# ---------------------------------------------------------------------------------------------------------------------


def expert_range(expert_num: int, active_expert_range: Sequence[int]) -> tuple[int, int]:
    """`[start, end)` of the experts this rank owns; empty `active_expert_range` means all `expert_num`."""
    if len(active_expert_range) == 0:
        return 0, expert_num
    return int(active_expert_range[0]), int(active_expert_range[1])


def dropless_rows(num_copies, active_num):
    """Rows of a dropless `expanded_x`: all `N*K` copies, or at most `active_num` when it is positive."""
    if active_num <= 0:
        return num_copies
    return torch.sym_min(active_num, num_copies)


def expanded_shape(num_tokens, topk, hidden, *, active_num, expert_capacity, expert_num, drop_pad_mode):
    if drop_pad_mode == DROP_PAD:
        return (expert_num, expert_capacity, hidden)
    return (dropless_rows(num_tokens * topk, active_num), hidden)


def count_shape(start: int, end: int, expert_num: int, expert_tokens_num_type: int, flag: bool) -> tuple:
    if not flag:
        return (0,)
    if expert_tokens_num_type == KEY_VALUE:
        return (expert_num, 2)
    return (end - start,)


# ---------------------------------------------------------------------------------------------------------------------
# moe_init_routing_v2
# ---------------------------------------------------------------------------------------------------------------------


def _route(expert_idx: torch.Tensor, start: int, end: int):
    """Sort the flat copies by expert: (key, order, rank, n_in_range). key = id - start, out of range -> end - start."""
    ids = expert_idx.reshape(-1).to(torch.int64)
    in_range = (ids >= start) & (ids < end)
    key = torch.where(in_range, ids - start, end - start)
    order = torch.sort(key, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=order.device)
    return key, order, rank, in_range.sum()


def _expert_counts(key: torch.Tensor, n_experts: int) -> torch.Tensor:
    ones = torch.ones_like(key)
    return scatter_add_rows(ones, key, n_experts)  # key == n_experts (out of range) is dropped


def _count_output(counts: torch.Tensor, start: int, expert_num: int, kind: int, flag: bool) -> torch.Tensor:
    if not flag:
        return counts.new_empty((0,))
    if kind == CUMSUM:
        return counts.cumsum(0)
    if kind == COUNT:
        return counts
    # KEY_VALUE: (expert id, count) of experts with tokens, packed at the head of an [expert_num, 2] table.
    nonzero = counts > 0
    position = torch.where(nonzero, nonzero.to(torch.int64).cumsum(0) - 1, -1)
    ids = torch.arange(start, start + counts.shape[0], device=counts.device, dtype=torch.int64)
    return scatter_rows(torch.stack([ids, counts], dim=1), position, expert_num, 0)


def _quantise(x_rows, valid, quant_mode, scale, offset, expert_of_row, start):
    """int8 rows and their per-row float32 scale. Invalid rows are zero (their scale too)."""
    xf = x_rows.to(torch.float32)
    if quant_mode == STATIC_QUANT:
        q = torch.round(xf * scale[0].to(torch.float32) + offset[0].to(torch.float32)).clamp(-128, 127)
        q = torch.where(valid.unsqueeze(-1), q, 0).to(torch.int8)
        return q, torch.zeros(x_rows.shape[0], dtype=torch.float32, device=x_rows.device)
    if scale is not None:
        if scale.shape[0] == 1:
            smooth = scale[0].to(torch.float32).unsqueeze(0)
        else:
            smooth = gather_rows(scale.to(torch.float32), torch.where(valid, expert_of_row - start, -1))
        xf = xf * smooth
    if guard_or_false(xf.shape[-1] == 0):
        amax = xf.new_zeros(xf.shape[0])
    else:
        amax = xf.abs().amax(-1)
    dyn_scale = torch.where(valid, amax / 127.0, 0.0)
    safe = torch.where(dyn_scale > 0, dyn_scale, 1.0).unsqueeze(-1)
    q = torch.where(dyn_scale.unsqueeze(-1) > 0, torch.round(xf / safe), 0.0).to(torch.int8)
    return q, dyn_scale


def moe_init_routing_v2(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    scale: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    active_num: int,
    expert_capacity: int,
    expert_num: int,
    drop_pad_mode: int,
    expert_tokens_num_type: int,
    expert_tokens_num_flag: bool,
    quant_mode: int,
    active_expert_range: Sequence[int],
    row_idx_type: int,
):
    num_tokens, topk = expert_idx.shape
    num_copies = num_tokens * topk
    start, end = expert_range(expert_num, active_expert_range)
    key, order, rank, n_in_range = _route(expert_idx, start, end)
    in_range = key < end - start
    counts = _expert_counts(key, end - start)
    copy = torch.arange(num_copies, device=x.device, dtype=torch.int64)

    if drop_pad_mode == DROP_PAD:
        capacity = expert_capacity
        first_row = counts.cumsum(0) - counts  # where each expert starts in `order`
        rank_in_expert = rank - gather_rows(first_row, key)
        row_of_copy = torch.where(in_range & (rank_in_expert < capacity), key * capacity + rank_in_expert, -1)
        num_rows = (end - start) * capacity
        copy_of_row = scatter_rows(copy, row_of_copy, num_rows, -1)
        expert_of_row = torch.arange(num_rows, device=x.device, dtype=torch.int64) // max(capacity, 1) + start
        expanded_row_idx = row_of_copy
    else:
        num_rows = dropless_rows(num_copies, active_num)
        row = torch.arange(num_rows, device=x.device, dtype=torch.int64)
        copy_of_row = torch.where(row < n_in_range, order[:num_rows], -1)
        expert_of_row = gather_rows(key, copy_of_row) + start
        if row_idx_type == GATHER_ROW_IDX:
            expanded_row_idx = torch.where(in_range & (rank < num_rows), rank, -1)
        else:
            expanded_row_idx = torch.where(copy < n_in_range, order, -1)

    valid = copy_of_row >= 0
    token_of_row = torch.where(valid, copy_of_row // topk, -1)
    x_rows = gather_rows(x, token_of_row)
    if quant_mode == NO_QUANT:
        expanded_x = x_rows
        if scale is not None:
            expanded_scale = gather_rows(scale, token_of_row)
        else:
            expanded_scale = torch.zeros(x_rows.shape[0], dtype=torch.float32, device=x.device)
    else:
        expanded_x, expanded_scale = _quantise(x_rows, valid, quant_mode, scale, offset, expert_of_row, start)

    hidden = x.shape[1]
    if drop_pad_mode == DROP_PAD:
        expanded_x = expanded_x.view(end - start, expert_capacity, hidden)
    count_out = _count_output(counts, start, expert_num, expert_tokens_num_type, expert_tokens_num_flag)
    return expanded_x, expanded_row_idx.to(torch.int32), count_out, expanded_scale


def copy_rows_from_row_idx(expanded_row_idx: torch.Tensor, row_idx_type: int, num_rows) -> torch.Tensor:
    """Row of every copy `j` (-1 if it has none), from either kind of `expanded_row_idx`."""
    row_idx = expanded_row_idx.to(torch.int64)
    if row_idx_type == GATHER_ROW_IDX:
        return torch.where(valid_rows(row_idx, num_rows), row_idx, -1)
    # Scatter form lists the copy of each row; rows past the expanded buffer do not exist.
    row = torch.arange(row_idx.shape[0], device=row_idx.device, dtype=torch.int64)
    return scatter_rows(row, torch.where(row < num_rows, row_idx, -1), row_idx.shape[0], -1)


def moe_init_routing_v2_backward(grad_expanded_x, grad_expanded_scale, expanded_row_idx, row_idx_type, topk):
    """Grads of `x` and of a per-token `scale` (quant_mode -1): each token sums the grads of its copies."""
    hidden = grad_expanded_x.shape[-1]
    grad_rows = grad_expanded_x.reshape(-1, hidden)
    row_of_copy = copy_rows_from_row_idx(expanded_row_idx, row_idx_type, grad_rows.shape[0])
    num_tokens = row_of_copy.shape[0] // max(topk, 1)
    acc = acc_dtype(grad_rows.dtype)
    grad_x = gather_rows(grad_rows, row_of_copy).to(acc).view(num_tokens, topk, hidden).sum(1)
    grad_scale = None
    if grad_expanded_scale is not None:
        grad_scale = gather_rows(grad_expanded_scale, row_of_copy).view(num_tokens, topk).sum(1)
    return grad_x.to(grad_expanded_x.dtype), grad_scale


# ---------------------------------------------------------------------------------------------------------------------
# moe_finalize_routing
# ---------------------------------------------------------------------------------------------------------------------

COLUMN_MAJOR_MODES = (0, 1)  # row index of copy (i, k) at k * N + i; modes 2/3 use i * K + k
DROP_PAD_MODES = (1, 3)  # expanded rows come as [E, C, H]


def finalize_index(expanded_src_to_dst_row: torch.Tensor, num_tokens, topk, drop_pad_mode: int) -> torch.Tensor:
    """`[N, K]` row index of every copy, whatever the layout of `expanded_src_to_dst_row`."""
    idx = expanded_src_to_dst_row.to(torch.int64)
    if drop_pad_mode in COLUMN_MAJOR_MODES:
        return idx.view(topk, num_tokens).t()
    return idx.view(num_tokens, topk)


def _finalize_terms(rows, bias, idx, expert_for_source_row):
    """`[N, K, H]` terms `expanded[idx] + bias[expert]` in the accumulation dtype, zero for invalid copies."""
    acc = acc_dtype(rows.dtype)
    valid = valid_rows(idx, rows.shape[0])
    terms = gather_rows(rows, idx.reshape(-1)).to(acc).view(idx.shape + (rows.shape[-1],))
    if bias is not None:
        experts = torch.where(valid, expert_for_source_row.to(torch.int64), -1)
        terms = terms + gather_rows(bias, experts.reshape(-1)).to(acc).view(terms.shape)
    return terms, valid


def moe_finalize_routing(
    expanded_permuted_rows,
    skip1,
    skip2,
    bias,
    scales,
    expanded_src_to_dst_row,
    expert_for_source_row,
    drop_pad_mode,
    topk,
):
    hidden = expanded_permuted_rows.shape[-1]
    rows = expanded_permuted_rows.reshape(-1, hidden)
    num_tokens = expanded_src_to_dst_row.shape[0] // max(topk, 1)
    idx = finalize_index(expanded_src_to_dst_row, num_tokens, topk, drop_pad_mode)
    terms, _ = _finalize_terms(rows, bias, idx, expert_for_source_row)
    if scales is not None:
        terms = terms * scales.to(terms.dtype).unsqueeze(-1)
    out = terms.sum(1)
    for skip in (skip1, skip2):
        if skip is not None:
            out = out + skip.to(out.dtype)
    return out.to(expanded_permuted_rows.dtype)


def moe_finalize_routing_backward(
    grad_out,
    expanded_permuted_rows,
    bias,
    scales,
    expanded_src_to_dst_row,
    expert_for_source_row,
    drop_pad_mode,
    topk,
    need_rows_grad: bool,
    need_bias_grad: bool,
    need_scales_grad: bool,
):
    """Grads of (expanded rows, bias, scales); skip1/skip2 simply receive `grad_out`."""
    hidden = expanded_permuted_rows.shape[-1]
    rows = expanded_permuted_rows.reshape(-1, hidden)
    num_tokens = grad_out.shape[0]
    idx = finalize_index(expanded_src_to_dst_row, num_tokens, topk, drop_pad_mode)
    acc = acc_dtype(rows.dtype)
    g = grad_out.to(acc).unsqueeze(1).expand(num_tokens, topk, hidden)  # d out / d term(i, k), before scales
    weighted = g if scales is None else g * scales.to(acc).unsqueeze(-1)
    valid = valid_rows(idx, rows.shape[0])
    weighted = torch.where(valid.unsqueeze(-1), weighted, 0.0).reshape(-1, hidden)

    grad_rows = grad_bias = grad_scales = None
    if need_rows_grad:
        grad_rows = scatter_add_rows(weighted, idx.reshape(-1), rows.shape[0])
        grad_rows = grad_rows.view(expanded_permuted_rows.shape).to(expanded_permuted_rows.dtype)
    if need_bias_grad:
        experts = torch.where(valid, expert_for_source_row.to(torch.int64), -1).reshape(-1)
        grad_bias = scatter_add_rows(weighted, experts, bias.shape[0]).to(bias.dtype)
    if need_scales_grad:
        terms, _ = _finalize_terms(rows, bias, idx, expert_for_source_row)
        grad_scales = (terms * g).sum(-1).to(scales.dtype)
    return grad_rows, grad_bias, grad_scales
