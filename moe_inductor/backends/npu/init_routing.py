"""moe_init_routing_v2 / moe_finalize_routing on torch_npu's fused kernels (functions of `reference.init_routing`).

Our ops define what torch_npu leaves undefined (SPEC §4); these wrappers translate each difference:

init routing
* `quant_mode`: always passed (torch_npu's default moved from 0 to -1 across releases). Static quantisation (0) is
  documented as unsupported by the kernel: it routes unquantised and we quantise the rows (elementwise) after.
* Counts: some releases accept only `expert_tokens_num_flag=True` with count or key-value mode, so we always ask for
  per-expert counts and build the output that was asked for (cumsum, count, key-value table, or empty) from them.
* `active_num <= 0` (ours: all rows) is passed as `N*K`, which every release accepts and which means the same.
* Rows past the valid count (`min(rows, ids in range)`) are garbage on the NPU; ours are zero, and so are their
  `expanded_scale`. `expanded_row_idx` is -1 for copies without a row (out of the active range, past `active_num`,
  over capacity), whatever the NPU left there.
* `expanded_scale` without quantisation: the NPU's is undefined without `scale` and, on the release path that
  dispatches to the older V2 kernel (expert_num 128, H 2048), is a different tensor altogether. We gather `scale`
  per row ourselves (zeros without it) and do not pass it to the kernel.
* `expanded_row_idx` is always requested in gather form (that release path returns it whatever was asked for) and
  turned into the scatter form here when that was asked for.
* Ids must be int32 and scales float32 on the NPU; int64 ids and float64 scales are converted.

finalize routing
* The kernel reads K from `scales` (K = 1 without them), so missing `scales` become ones.
* A -1 row index (a dropped copy) is outside the kernel's documented range in dropless modes: it is redirected to row
  0 with weight 0 (and expert 0 for the bias). Rows are assumed finite (they are expert outputs), as 0 * inf = nan.
* `skip2` may only be given with `skip1`; a lone `skip1` is passed as `skip2` (the two are summed).
* All floating inputs must have the rows' dtype, indices int32: converted.

Backward: torch_npu has none for these ops; our autograd formulas run the plain-torch reference functions below on
the NPU.
"""

from __future__ import annotations

import torch

from ...reference import init_routing as ref
from ...reference._rows import gather_rows, scatter_rows
from ...reference.init_routing import moe_finalize_routing_backward, moe_init_routing_v2_backward
from ._native import KERNEL_FLOATS, torch_npu

__all__ = [
    "moe_finalize_routing",
    "moe_finalize_routing_backward",
    "moe_init_routing_v2",
    "moe_init_routing_v2_backward",
]

_X_DTYPES = KERNEL_FLOATS + (torch.int8,)


def _row_of_copy(position, expert_idx, start, end, num_rows, avail, drop_pad_mode):
    """Row of every copy (-1: none) from the NPU's gather index, keeping only the entries the NPU defines.

    Dropless, the NPU writes every copy's position in the sort, so copies out of the active range or past the rows
    point past the valid rows; drop/pad, dropped copies are -1 already.
    """
    ids = expert_idx.reshape(-1).to(torch.int64)
    in_range = (ids >= start) & (ids < end)
    position = position.to(torch.int64)
    limit = num_rows if drop_pad_mode == ref.DROP_PAD else torch.clamp(avail, max=num_rows)
    return torch.where(in_range & (position >= 0) & (position < limit), position, -1), in_range


def moe_init_routing_v2(
    x,
    expert_idx,
    scale,
    offset,
    active_num,
    expert_capacity,
    expert_num,
    drop_pad_mode,
    expert_tokens_num_type,
    expert_tokens_num_flag,
    quant_mode,
    active_expert_range,
    row_idx_type,
):
    args = (x, expert_idx, scale, offset, active_num, expert_capacity, expert_num, drop_pad_mode)
    args += (expert_tokens_num_type, expert_tokens_num_flag, quant_mode, active_expert_range, row_idx_type)
    if x.dtype not in _X_DTYPES or expert_idx.numel() == 0 or x.shape[1] == 0:
        return ref.moe_init_routing_v2(*args)
    num_tokens, topk = expert_idx.shape
    num_copies = num_tokens * topk
    start, end = ref.expert_range(expert_num, active_expert_range)
    kernel_quant = ref.NO_QUANT if quant_mode == ref.STATIC_QUANT else quant_mode
    expanded_x, row_idx, counts, kernel_scale = torch_npu().npu_moe_init_routing_v2(
        x,
        expert_idx.to(torch.int32),
        scale=scale.to(torch.float32) if quant_mode == ref.DYNAMIC_QUANT and scale is not None else None,
        offset=None,
        active_num=active_num if active_num > 0 else num_copies,
        expert_capacity=expert_capacity,
        expert_num=expert_num,
        drop_pad_mode=drop_pad_mode,
        expert_tokens_num_type=ref.COUNT,
        expert_tokens_num_flag=True,
        quant_mode=kernel_quant,
        active_expert_range=[start, end],
        # Gather form always: the release path that dispatches to the older V2 kernel returns it whatever was asked.
        row_idx_type=ref.GATHER_ROW_IDX,
    )
    counts = counts[: end - start]
    avail = counts.sum()

    # Which output row holds which copy, from the index with every undefined entry made -1.
    hidden = x.shape[1]
    rows = expanded_x.reshape(-1, hidden)
    num_rows = rows.shape[0]
    row_of_copy, in_range = _row_of_copy(row_idx, expert_idx, start, end, num_rows, avail, drop_pad_mode)
    copy = torch.arange(num_copies, device=x.device)
    copy_of_row = scatter_rows(copy, row_of_copy, num_rows, -1)
    valid = copy_of_row >= 0
    if row_idx_type == ref.GATHER_ROW_IDX:
        expanded_row_idx = row_of_copy
    else:  # scatter form: the copy at each sorted position, for the `avail` positions that exist
        expanded_row_idx = scatter_rows(copy, torch.where(in_range, row_idx.to(torch.int64), -1), num_copies, -1)

    if quant_mode == ref.STATIC_QUANT:
        q = torch.round(rows.float() * scale[0].float() + offset[0].float()).clamp(-128, 127)
        rows = torch.where(valid.unsqueeze(-1), q, 0).to(torch.int8)
    else:
        rows = torch.where(valid.unsqueeze(-1), rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if quant_mode == ref.DYNAMIC_QUANT:
        expanded_scale = torch.where(valid, kernel_scale[:num_rows], 0.0)
    elif quant_mode == ref.NO_QUANT and scale is not None:
        expanded_scale = gather_rows(scale, torch.where(valid, copy_of_row // topk, -1))
    else:
        expanded_scale = torch.zeros(num_rows, dtype=torch.float32, device=x.device)

    count_out = ref._count_output(counts, start, expert_num, expert_tokens_num_type, expert_tokens_num_flag)
    return rows.view(expanded_x.shape), expanded_row_idx.to(torch.int32), count_out, expanded_scale


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
    args = (expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row, expert_for_source_row)
    dtype = expanded_permuted_rows.dtype
    num_rows = expanded_permuted_rows.numel() // max(expanded_permuted_rows.shape[-1], 1)
    num_tokens = expanded_src_to_dst_row.shape[0] // max(topk, 1)
    if dtype not in KERNEL_FLOATS or num_rows == 0 or num_tokens == 0:
        return ref.moe_finalize_routing(*args, drop_pad_mode, topk)

    idx = ref.finalize_index(expanded_src_to_dst_row, num_tokens, topk, drop_pad_mode)  # [N, K] view, any mode
    valid = (idx >= 0) & (idx < num_rows)
    weights = scales.to(dtype) if scales is not None else idx.new_ones(idx.shape, dtype=dtype)
    weights = torch.where(valid, weights, torch.zeros((), dtype=dtype, device=weights.device))
    safe_idx = torch.where(valid, idx, 0)
    if drop_pad_mode in ref.COLUMN_MAJOR_MODES:
        safe_idx = safe_idx.t()
    experts = None
    if expert_for_source_row is not None:
        experts = torch.where(valid, expert_for_source_row.to(torch.int64), 0).to(torch.int32)
    if skip2 is None:
        skip1, skip2 = None, skip1

    def same_dtype(t):
        return t.to(dtype) if t is not None else None

    return torch_npu().npu_moe_finalize_routing(
        expanded_permuted_rows,
        same_dtype(skip1),
        same_dtype(skip2),
        same_dtype(bias),
        weights,
        safe_idx.reshape(-1).to(torch.int32),
        experts,
        drop_pad_mode=drop_pad_mode,
    )
