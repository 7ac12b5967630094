"""TEST-ONLY stand-in for `torch_npu`: the documented semantics of the MoE kernels we call, in plain torch on CPU.

Written from torch_npu / CANN documentation (formulas and constraints of aclnnMoeTokenPermuteWithRoutingMap,
aclnnMoeTokenUnpermuteWithRoutingMap, npu_moe_init_routing_v2 and its op-plugin kernel, npu_moe_finalize_routing /
MoeFinalizeRoutingV2, npu_grouped_matmul), not from `moe_inductor.reference`, so that comparing the two is a check.
It reproduces what our wrappers must translate, and rejects what the real kernels reject:

* the documented argument constraints (int32 indices, bool/int8 maps, one float dtype per call, count mode with the
  counts flag on, no static quantisation, `quant_mode` defaulting to 0, skip2 only with skip1, groups that cover
  `x`, no count list of length one, bf16 bias as float32, no split-K);
* undefined outputs filled with garbage (NaN rows, random indices, an undefined counts tail), never zeros;
* the init_routing quirk of the op-plugin kernel that dispatches to the older V2 kernel (expert_num 128, range
  [0, 128), H 2048, count mode, no quantisation): its 4th output is an int32 tensor of `expert_num` entries and the
  row index is always in gather form.

Install it with `sys.modules["torch_npu"] = torch_npu_standin` (tests do it through monkeypatch). Never shipped.
"""

from __future__ import annotations

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
CALLS: list[tuple[str, dict]] = []  # (function, keyword arguments) of every call, for tests that check arguments


class StandinError(ValueError):
    """What the real kernel would reject."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise StandinError(message)


def _garbage_like(t: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    return torch.randint(-50, 50, t.shape, generator=gen).to(t.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# aclnnMoeTokenPermuteWithRoutingMap / aclnnMoeTokenUnpermuteWithRoutingMap
# ---------------------------------------------------------------------------------------------------------------------


def npu_moe_token_permute_with_routing_map(tokens, routing_map, *, probs=None, num_out_tokens=None, drop_and_pad=False):
    CALLS.append(("permute", dict(num_out_tokens=num_out_tokens, drop_and_pad=drop_and_pad, probs=probs)))
    _require(tokens.dtype in FLOATS, f"tokens dtype {tokens.dtype}")
    _require(routing_map.dtype in (torch.bool, torch.int8), f"routing_map dtype {routing_map.dtype}")
    _require(probs is None or probs.dtype == tokens.dtype, "probs must have the tokens' dtype")
    num_tokens, num_experts = routing_map.shape
    mask_t = routing_map.bool().t()  # [E, T]
    n = num_tokens if num_out_tokens is None else num_out_tokens
    if not drop_and_pad:
        topk = n // num_tokens
        _require(bool((routing_map.bool().sum(1) == topk).all()), "every token must route to num_out_tokens // T")
        expert_index = torch.arange(num_tokens).expand(num_experts, -1)
        sorted_first = expert_index.masked_select(mask_t)  # token of each row, expert-major
        sorted_out = torch.argsort(sorted_first, stable=True)  # row of each (token, j-th expert) copy
        permuted = tokens.new_empty((topk * num_tokens, tokens.shape[1]))
        permuted[sorted_out] = tokens[torch.arange(topk * num_tokens) // topk]
        permuted_probs = probs.t().masked_select(mask_t) if probs is not None else None
        return permuted, permuted_probs, sorted_out.to(torch.int32)
    capacity = n // num_experts
    # The formula reads argsort(routingMap.T)[:, :capacity]; routed tokens come first (a stable descending sort).
    sorted_out = torch.argsort(mask_t.to(torch.int32), dim=-1, descending=True, stable=True)[:, :capacity]
    permuted = tokens.index_select(0, sorted_out.reshape(-1))
    permuted_probs = None
    if probs is not None:
        flat = (torch.arange(num_experts).view(-1, 1) * num_tokens + sorted_out).reshape(-1)
        permuted_probs = probs.t().reshape(-1).index_select(0, flat)
    return permuted, permuted_probs, sorted_out.reshape(-1).to(torch.int32)


def npu_moe_token_unpermute_with_routing_map(
    permuted_tokens, sorted_indices, restore_shape, *, probs=None, routing_map=None, drop_and_pad=False
):
    CALLS.append(("unpermute", dict(drop_and_pad=drop_and_pad, probs=probs, routing_map=routing_map)))
    _require(permuted_tokens.dtype in FLOATS, f"permuted_tokens dtype {permuted_tokens.dtype}")
    _require(sorted_indices.dtype == torch.int32, f"sorted_indices dtype {sorted_indices.dtype}")
    _require(probs is None or probs.dtype == permuted_tokens.dtype, "probs must have the tokens' dtype")
    _require(routing_map is None or routing_map.dtype in (torch.bool, torch.int8), "routing_map dtype")
    out = torch.zeros(tuple(restore_shape), dtype=torch.float32)
    rows = permuted_tokens.float()
    idx = sorted_indices.long()
    if drop_and_pad:
        if probs is not None:
            capacity = idx.shape[0] // probs.shape[1]
            weight = probs.float()[idx, torch.arange(idx.shape[0]) // capacity]
            rows = rows * weight.unsqueeze(-1)
        out.index_add_(0, idx, rows)  # permuteTokenId / outIndex sort: a scatter-add by token
        return out.to(permuted_tokens.dtype)
    topk = idx.shape[0] // restore_shape[0] if restore_shape[0] else 0
    if probs is not None:
        permuted_probs = probs.float().t().masked_select(routing_map.bool().t())
        rows = rows * permuted_probs.unsqueeze(-1)
    for i in range(idx.shape[0]):  # -1 marks an unused slot
        if idx[i] >= 0:
            out[i // topk] += rows[idx[i]]
    return out.to(permuted_tokens.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# npu_moe_init_routing_v2 (op-plugin eager kernel: shapes as allocated there)
# ---------------------------------------------------------------------------------------------------------------------


def npu_moe_init_routing_v2(
    x,
    expert_idx,
    *,
    scale=None,
    offset=None,
    active_num=-1,
    expert_capacity=-1,
    expert_num=-1,
    drop_pad_mode=0,
    expert_tokens_num_type=0,
    expert_tokens_num_flag=False,
    quant_mode=0,
    active_expert_range=(),
    row_idx_type=0,
):
    CALLS.append(
        (
            "init_routing",
            dict(
                scale=scale,
                offset=offset,
                active_num=active_num,
                expert_num=expert_num,
                drop_pad_mode=drop_pad_mode,
                expert_tokens_num_type=expert_tokens_num_type,
                expert_tokens_num_flag=expert_tokens_num_flag,
                quant_mode=quant_mode,
                active_expert_range=list(active_expert_range),
                row_idx_type=row_idx_type,
            ),
        )
    )
    _require(expert_idx.dtype == torch.int32, f"expert_idx dtype {expert_idx.dtype}")
    _require(x.dtype in FLOATS + (torch.int8,), f"x dtype {x.dtype}")
    _require(quant_mode in (-1, 1), f"quant_mode {quant_mode}: static quantisation (0) is not supported")
    _require(expert_tokens_num_flag, "expert_tokens_num_flag: only True is supported")
    _require(expert_tokens_num_type in (1, 2), f"expert_tokens_num_type {expert_tokens_num_type}: only 1 and 2")
    _require(active_num >= 0, f"active_num {active_num} must be >= 0")
    _require(scale is None or scale.dtype == torch.float32, "scale must be float32")
    num_tokens, topk = expert_idx.shape
    hidden = x.shape[1]
    start, end = active_expert_range if len(active_expert_range) else (0, expert_num)
    ids = expert_idx.reshape(-1).long()
    in_range = (ids >= start) & (ids < end)
    key = torch.where(in_range, ids, end)  # out of range sorts to the tail
    sorted_row_idx = torch.argsort(key, stable=True)  # keyValueSort
    avail = int(in_range.sum())
    position = torch.empty_like(sorted_row_idx)
    position[sorted_row_idx] = torch.arange(ids.shape[0])  # expandedRowIdx[sortedRowIdx[i]] = i
    counts = torch.bincount(ids[in_range] - start, minlength=end - start)
    v2_path = expert_num == 128 and [start, end] == [0, 128] and hidden == 2048 and quant_mode == -1
    v2_path = v2_path and expert_tokens_num_type == 1

    if drop_pad_mode == 1:
        capacity = expert_capacity
        rank_in_expert = position - (counts.cumsum(0) - counts)[torch.clamp(key - start, max=end - start - 1)]
        slot = torch.where(in_range & (rank_in_expert < capacity), (key - start) * capacity + rank_in_expert, -1)
        expanded = torch.zeros((expert_num * capacity, hidden), dtype=x.dtype)  # unused slots are zero-filled
        used = slot >= 0
        expanded[slot[used]] = x[torch.arange(ids.shape[0])[used] // topk]
        row_idx = slot
        source = torch.full((expert_num * capacity,), -1, dtype=torch.long)
        source[slot[used]] = torch.arange(ids.shape[0])[used]
    else:
        rows = min(num_tokens * topk, active_num) if active_num > 0 else num_tokens * topk
        valid_rows = min(rows, avail)
        source = torch.full((rows,), -1, dtype=torch.long)
        source[:valid_rows] = sorted_row_idx[:valid_rows]
        expanded = _garbage_like(torch.empty((rows, hidden), dtype=x.dtype))
        expanded[:valid_rows] = x[sorted_row_idx[:valid_rows] // topk]
        if row_idx_type == 0 or v2_path:
            row_idx = position
        else:
            row_idx = _garbage_like(torch.empty(ids.shape[0], dtype=torch.int64)).abs() % max(ids.shape[0], 1)
            row_idx[:avail] = sorted_row_idx[:avail]

    num_rows = source.shape[0]
    valid = source >= 0
    scale_out = torch.full((num_rows,), float("nan"))
    if quant_mode == 1:
        xf = expanded.float()
        if scale is not None:
            expert_of_row = torch.where(valid, ids[source.clamp(min=0)] - start, 0)
            xf = xf * (scale[0] if scale.shape[0] == 1 else scale[expert_of_row])
        dynamic_scale = xf.abs().amax(-1) / 127.0 if hidden else torch.zeros(num_rows)
        q = torch.round(xf / torch.where(dynamic_scale > 0, dynamic_scale, 1.0).unsqueeze(-1)).to(torch.int8)
        expanded = torch.where(valid.unsqueeze(-1), q, _garbage_like(q))
        scale_out = torch.where(valid, dynamic_scale, scale_out)
    elif scale is not None:
        scale_out = torch.where(valid, scale[(source // topk).clamp(min=0)], scale_out)

    if expert_tokens_num_type == 2:
        table = _garbage_like(torch.empty((expert_num, 2), dtype=torch.int64))
        nonzero = (counts > 0).nonzero().reshape(-1)
        table[: nonzero.shape[0], 0] = nonzero + start
        table[: nonzero.shape[0], 1] = counts[nonzero]
        counts_out = table
    else:
        counts_out = counts.to(torch.int64)

    if drop_pad_mode == 1:
        expanded = expanded.view(expert_num, expert_capacity, hidden)
    if v2_path:  # the older kernel's expert_tokens_before_capacity, in place of expanded_scale
        return expanded, row_idx.to(torch.int32), counts_out, torch.zeros(expert_num, dtype=torch.int32)
    return expanded, row_idx.to(torch.int32), counts_out, scale_out


# ---------------------------------------------------------------------------------------------------------------------
# npu_moe_finalize_routing (MoeFinalizeRoutingV2)
# ---------------------------------------------------------------------------------------------------------------------


def npu_moe_finalize_routing(
    expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row, export_for_source_row, drop_pad_mode=0
):
    CALLS.append(("finalize", dict(skip1=skip1, skip2=skip2, scales=scales, drop_pad_mode=drop_pad_mode)))
    dtype = expanded_permuted_rows.dtype
    _require(dtype in FLOATS, f"expanded dtype {dtype}")
    for name, t in (("skip1", skip1), ("skip2", skip2), ("bias", bias), ("scales", scales)):
        _require(t is None or t.dtype == dtype, f"{name} must have the dtype of expanded_permuted_rows")
    _require(expanded_src_to_dst_row.dtype == torch.int32, "expanded_src_to_dst_row must be int32")
    _require(export_for_source_row is None or export_for_source_row.dtype == torch.int32, "expert ids must be int32")
    _require(skip2 is not None or skip1 is None, "skip1 needs skip2")
    _require(drop_pad_mode in (0, 1, 2, 3), f"drop_pad_mode {drop_pad_mode}")
    rows = expanded_permuted_rows.reshape(-1, expanded_permuted_rows.shape[-1]).float()
    topk = scales.shape[1] if scales is not None else 1  # "when scales is null, K is 1"
    idx = expanded_src_to_dst_row.long()
    num_tokens = idx.shape[0] // topk
    if drop_pad_mode in (0, 2):
        _require(bool(((idx >= 0) & (idx < rows.shape[0])).all()), "dropless row indices must be in [0, rows)")
    out = torch.zeros((num_tokens, rows.shape[1]))
    for i in range(num_tokens):
        for k in range(topk):
            r = int(idx[k * num_tokens + i] if drop_pad_mode in (0, 1) else idx[i * topk + k])
            if r < 0:
                continue
            term = rows[r] + (bias[export_for_source_row[i, k]].float() if bias is not None else 0)
            out[i] += term * (scales[i, k].float() if scales is not None else 1.0)
    for skip in (skip1, skip2):
        if skip is not None:
            out += skip.float()
    return out.to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# npu_grouped_matmul
# ---------------------------------------------------------------------------------------------------------------------


def npu_grouped_matmul(
    x,
    weight,
    *,
    bias=None,
    scale=None,
    offset=None,
    antiquant_scale=None,
    antiquant_offset=None,
    per_token_scale=None,
    group_list=None,
    activation_input=None,
    activation_quant_scale=None,
    activation_quant_offset=None,
    split_item=0,
    group_type=None,
    group_list_type=0,
    act_type=0,
    output_dtype=None,
    tuning_config=None,
):
    CALLS.append(("gmm", dict(split_item=split_item, group_type=group_type, group_list_type=group_list_type)))
    _require(split_item == 3 and len(x) == 1 and len(weight) == 1, "this stand-in models single tensors only")
    _require(group_type == 0, f"group_type {group_type}: Atlas A2/A3 support -1 and 0")
    (x,), (w,) = x, weight
    _require(w.dim() == 3 and x.dim() == 2, "x [M, K], weight [G, K, N]")
    _require(isinstance(group_list, torch.Tensor) and group_list.dtype == torch.int64, "group_list: int64 tensor")
    counts = group_list if group_list_type == 1 else torch.diff(group_list, prepend=group_list.new_zeros(1))
    if group_list_type == 1:
        _require(group_list.shape[0] != 1, "a count group_list cannot have length 1")
    _require(bool((counts >= 0).all()), "group_list must be non-negative / non-decreasing")
    _require(int(counts.sum()) == x.shape[0], "group_list must cover every row of x")
    if bias is not None:
        want = torch.float32 if x.dtype == torch.bfloat16 else x.dtype
        _require(bias[0].dtype == want, f"bias dtype {bias[0].dtype}, expected {want}")
    y = torch.empty((x.shape[0], w.shape[2]), dtype=x.dtype)
    start = 0
    for g, n in enumerate(counts.tolist()):
        part = x[start : start + n].float() @ w[g].float()
        if bias is not None:
            part = part + bias[0][g].float()
        y[start : start + n] = part.to(x.dtype)
        start += n
    return [y]
