"""Test oracles, written independently of `moe_inductor.reference`.

Two kinds:
* literal transcriptions of the eager code our ops replace (Megatron-LM `moe_utils.permute/unpermute` in its
  masked_select and argsort forms, kept in `moe_inductor.testing.eager` and re-exported here; the
  aclnnMoeTokenPermuteWithRoutingMap formulas of seed 001), which our ops must equal exactly;
* slow Python loops straight from SPEC.md, for the ops whose source is a prose description.
"""

from __future__ import annotations

import torch

from moe_inductor.testing.eager import (  # noqa: F401  (re-exported for the tests)
    megatron_permute_argsort,
    megatron_permute_masked_select,
    megatron_unpermute,
)

# ---------------------------------------------------------------------------------------------------------------------
# aclnnMoeTokenPermuteWithRoutingMap (seed 001), formulas transcribed
# ---------------------------------------------------------------------------------------------------------------------


def npu_permute_formula(tokens, routing_map, probs=None, num_out_tokens=None, drop_and_pad=False):
    tokens_num, expert_num = routing_map.shape
    if num_out_tokens is None:
        num_out_tokens = tokens_num
    if not drop_and_pad:
        expert_index = torch.arange(tokens_num).expand(expert_num, -1)
        sorted_indices_first = expert_index.masked_select(routing_map.bool().T)
        sorted_indices_out = torch.argsort(sorted_indices_first, stable=True)
        top_k = num_out_tokens // tokens_num if tokens_num else 0
        out_token = top_k * tokens_num
        permute_tokens = tokens.new_zeros((out_token, tokens.shape[1]))
        for i in range(out_token):
            permute_tokens[sorted_indices_out[i]] = tokens[i // top_k]
        permute_probs = None
        if probs is not None:
            permute_probs = probs.T.masked_select(routing_map.bool().T)
        return permute_tokens, permute_probs, sorted_indices_out.int()
    capacity = num_out_tokens // expert_num
    sorted_indices_out = torch.argsort(routing_map.to(torch.int8).T, dim=-1, descending=True, stable=True)
    sorted_indices_out = sorted_indices_out[:, :capacity].reshape(-1)
    permuted_tokens = tokens.index_select(0, sorted_indices_out)
    permute_probs = None
    if probs is not None:
        probs_t_1d = probs.T.reshape(-1)
        indices_dim0 = torch.arange(expert_num).view(expert_num, 1)
        indices_dim1 = sorted_indices_out.view(expert_num, capacity)
        indices_1d = (indices_dim0 * tokens_num + indices_dim1).view(-1)
        permute_probs = probs_t_1d.index_select(0, indices_1d)
    return permuted_tokens, permute_probs, sorted_indices_out.int()


# ---------------------------------------------------------------------------------------------------------------------
# Loops from SPEC.md
# ---------------------------------------------------------------------------------------------------------------------


def multihot_loop(indices, probs, num_local_experts):
    num_tokens, topk = indices.shape
    routing_map = torch.zeros(num_tokens, num_local_experts, dtype=torch.bool)
    probs_map = torch.zeros(num_tokens, num_local_experts, dtype=probs.dtype)
    for t in range(num_tokens):
        for k in range(topk):
            e = int(indices[t, k])
            if 0 <= e < num_local_experts:
                routing_map[t, e] = True
                probs_map[t, e] = probs[t, k]
    return routing_map, probs_map


def init_routing_loop(
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
    quant_mode=-1,
    active_expert_range=(),
    row_idx_type=0,
):
    num_tokens, topk = expert_idx.shape
    hidden = x.shape[1]
    start, end = (0, expert_num) if len(active_expert_range) == 0 else tuple(active_expert_range)
    ids = [int(v) for v in expert_idx.reshape(-1)]
    in_range = [start <= e < end for e in ids]
    order = sorted(range(len(ids)), key=lambda j: (ids[j] - start) if in_range[j] else end - start)  # stable
    avail = sum(in_range)
    counts = [sum(1 for j, e in enumerate(ids) if in_range[j] and e == start + c) for c in range(end - start)]

    copy_of_row = {}
    row_of_copy = [-1] * len(ids)
    if drop_pad_mode == 1:
        num_rows = (end - start) * expert_capacity
        seen = [0] * (end - start)
        for j in order[:avail]:
            c = ids[j] - start
            if seen[c] < expert_capacity:
                row = c * expert_capacity + seen[c]
                copy_of_row[row] = j
                row_of_copy[j] = row
            seen[c] += 1
    else:
        num_rows = len(ids) if active_num <= 0 else min(active_num, len(ids))
        for i in range(min(num_rows, avail)):
            copy_of_row[i] = order[i]
            row_of_copy[order[i]] = i

    out_dtype = x.dtype if quant_mode == -1 else torch.int8
    expanded_x = torch.zeros(num_rows, hidden, dtype=out_dtype)
    expanded_scale = torch.zeros(
        num_rows, dtype=scale.dtype if (scale is not None and quant_mode == -1) else torch.float32
    )
    for row, j in copy_of_row.items():
        t, e = j // topk, ids[j]
        if quant_mode == -1:
            expanded_x[row] = x[t]
            if scale is not None:
                expanded_scale[row] = scale[t]
        elif quant_mode == 1:
            xf = x[t].float()
            if scale is not None:
                xf = xf * (scale[0] if scale.shape[0] == 1 else scale[e - start]).float()
            ds = xf.abs().max() / 127.0
            expanded_scale[row] = ds
            expanded_x[row] = torch.round(xf / ds).to(torch.int8) if ds > 0 else 0
        else:
            q = torch.round(x[t].float() * scale[0].float() + offset[0].float()).clamp(-128, 127)
            expanded_x[row] = q.to(torch.int8)
    if drop_pad_mode == 1:
        expanded_x = expanded_x.view(end - start, expert_capacity, hidden)

    if row_idx_type == 0:
        row_idx = torch.tensor(row_of_copy, dtype=torch.int32)
    else:
        row_idx = torch.tensor(order[:avail] + [-1] * (len(ids) - avail), dtype=torch.int32)

    if not expert_tokens_num_flag:
        count_out = torch.zeros(0, dtype=torch.int64)
    elif expert_tokens_num_type == 0:
        count_out = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    elif expert_tokens_num_type == 1:
        count_out = torch.tensor(counts, dtype=torch.int64)
    else:
        count_out = torch.zeros(expert_num, 2, dtype=torch.int64)
        pairs = [(start + c, n) for c, n in enumerate(counts) if n > 0]
        for i, (e, n) in enumerate(pairs):
            count_out[i, 0], count_out[i, 1] = e, n
    return expanded_x, row_idx, count_out, expanded_scale


def finalize_loop(expanded, skip1, skip2, bias, scales, row_idx, expert_for_source_row, drop_pad_mode, topk):
    hidden = expanded.shape[-1]
    rows = expanded.reshape(-1, hidden).double()
    num_tokens = row_idx.numel() // topk
    out = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    for i in range(num_tokens):
        if skip1 is not None:
            out[i] += skip1[i].double()
        if skip2 is not None:
            out[i] += skip2[i].double()
        for k in range(topk):
            r = int(row_idx[k * num_tokens + i] if drop_pad_mode in (0, 1) else row_idx[i * topk + k])
            if r < 0:
                continue
            term = rows[r].clone()
            if bias is not None:
                term += bias[int(expert_for_source_row[i, k])].double()
            out[i] += term * (1.0 if scales is None else float(scales[i, k]))
    return out


#: gmm against `gmm_loop`: fp32 accumulation over K, one rounding to the output dtype.
GMM_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def gmm_loop(x, weight, bias, ends, group_type):
    """float64 per-group loop; `ends` are cumulative end offsets (a list of ints)."""
    x64, w64 = x.double(), weight.double()
    start = 0
    if group_type == 0:
        out = torch.zeros(x.shape[0], weight.shape[2], dtype=torch.float64)
        for g, end in enumerate(ends):
            for m in range(start, end):
                out[m] = x64[m] @ w64[g] + (bias[g].double() if bias is not None else 0)
            start = end
        return out
    out = torch.zeros(len(ends), x.shape[0], weight.shape[1], dtype=torch.float64)
    for g, end in enumerate(ends):
        for kk in range(start, end):
            out[g] += torch.outer(x64[:, kk], w64[kk])
        start = end
    return out
