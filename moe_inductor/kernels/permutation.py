"""Triton kernels for routing-map permute / unpermute (both conventions), forward and backward.

Same functions and results as `moe_inductor.reference.permutation`. One row map carries everything:

* `PairRows.row_of_pair[t, e]` (int32, `[T, E]`, -1 = no row) is the output row of every (token, expert) pair, in
  the row order of the reference (expert-major, ascending token, routed pairs first, then fillers). It comes from a
  counting sort over the routing map in three small launches, no global sort and no host sync:
  `_column_counts` (routed tokens per chunk of tokens and expert), `_scan_chunks` (exclusive prefix over chunks, per
  expert, as one tile-wide `tl.cumsum`) and `_pair_rows` (each pair's rank; writes the row map and, on request, the
  per-row outputs: token of each row, permuted probs, torch_npu's inverse map).
* Data movement is token-major: one program per (token, block of H) reads the token's row of `row_of_pair`, ranks
  its valid entries with a prefix sum and walks them in ascending expert (= ascending row) order. Permute reads each
  token row once and writes its copies; unpermute gathers a token's rows, weights and sums them in float32 and stores
  once: no atomics, deterministic, and bitwise the reference's summation order.

Where only a forward map (token of each row) is known (Megatron `unpermute` without probs, drop-and-pad unpermute)
the rows are grouped by token with a stable `torch.sort` into a CSR list first; torch_npu's dropless inverse map
already is a token-major list. Offsets into `[rows, H]` buffers are int64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false
import triton
import triton.language as tl

from ..reference import permutation as ref
from ..reference._rows import acc_dtype, gather_rows, valid_rows
from ._launch import launcher, next_pow2, size_hint

_INT32_MAX = 2**31 - 1

# ---------------------------------------------------------------------------------------------------------------------
# Kernels: the row map
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _column_counts(map_ptr, counts_ptr, T, E, stride_t, stride_e, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """counts[c, e] = routed tokens of expert e in token chunk c."""
    c = tl.program_id(0)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    t = c * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = (t[:, None] < T) & (e[None, :] < E)
    offs = t[:, None].to(tl.int64) * stride_t + e[None, :] * stride_e
    routed = (tl.load(map_ptr + offs, mask=mask, other=0) != 0).to(tl.int32)
    tl.store(counts_ptr + c * E + e, tl.sum(routed, axis=0), mask=e < E)


@triton.jit
def _scan_chunks(counts_ptr, totals_ptr, num_chunks, E, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """In place: counts[c, e] -> routed tokens of expert e before chunk c; totals[e] = all routed tokens of e."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    carry = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c[:, None] < num_chunks) & (e[None, :] < E)
        ptrs = counts_ptr + c[:, None] * E + e[None, :]
        tile = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, tl.cumsum(tile, axis=0) - tile + carry[None, :], mask=mask)
        carry += tl.sum(tile, axis=0)
    tl.store(totals_ptr + e, carry, mask=e < E)


@triton.jit
def _pair_rows(
    map_ptr,
    probs_ptr,
    offsets_ptr,
    totals_ptr,
    rows_ptr,
    token_of_row_ptr,
    permuted_probs_ptr,
    inverse_ptr,
    list_ptr,
    count_ptr,
    list_w_ptr,
    T,
    E,
    num_rows,
    capacity,
    inverse_k,
    stride_mt,
    stride_me,
    stride_pt,
    stride_pe,
    PAD: tl.constexpr,
    HAS_PROBS: tl.constexpr,
    WRITE_TOKENS: tl.constexpr,
    WRITE_INVERSE: tl.constexpr,
    WRITE_LIST: tl.constexpr,
    LIST_WEIGHTS: tl.constexpr,
    LIST_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Row of every pair of one chunk of tokens (all experts in one tile), plus the per-row outputs asked for."""
    c = tl.program_id(0)
    t = c * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    in_e = e < E
    mask = (t[:, None] < T) & in_e[None, :]
    routed = tl.load(map_ptr + t[:, None].to(tl.int64) * stride_mt + e[None, :] * stride_me, mask=mask, other=0) != 0
    routed_i = routed.to(tl.int32)

    totals = tl.load(totals_ptr + e, mask=in_e, other=0)
    chunk_offset = tl.load(offsets_ptr + c * E + e, mask=in_e, other=0)
    # Routed tokens of expert e before token t; the non-routed ones before t are the rest.
    before = chunk_offset[None, :] + tl.cumsum(routed_i, axis=0) - routed_i
    not_before = t[:, None] - before
    if PAD:
        rank = tl.where(routed, before, totals[None, :] + not_before)
        row = tl.where(rank < capacity, e[None, :] * capacity + rank, -1)
    else:
        expert_offset = tl.cumsum(totals, axis=0) - totals
        num_routed = tl.sum(totals, axis=0)
        filler_offset = num_routed + e * T - expert_offset
        rank = tl.where(routed, expert_offset[None, :] + before, filler_offset[None, :] + not_before)
        row = tl.where(rank < num_rows, rank, -1)
    row = tl.where(mask, row, -1)
    has_row = row >= 0
    tl.store(rows_ptr + t[:, None].to(tl.int64) * E + e[None, :], row, mask=mask)

    safe_row = tl.where(has_row, row, 0).to(tl.int64)
    if WRITE_TOKENS:
        tokens = tl.broadcast_to(t[:, None], [BLOCK_T, BLOCK_E])
        tl.store(token_of_row_ptr + safe_row, tokens.to(token_of_row_ptr.dtype.element_ty), mask=has_row)
    if HAS_PROBS or LIST_WEIGHTS:
        # Only the pairs with a row: a few sectors per token instead of the whole [T, E] map.
        p = tl.load(probs_ptr + t[:, None].to(tl.int64) * stride_pt + e[None, :] * stride_pe, mask=has_row, other=0)
    if HAS_PROBS:
        tl.store(permuted_probs_ptr + safe_row, p, mask=has_row)
    # Token-major lists: -1 everywhere first, then each listed pair scattered to its slot (slots are unique within a
    # token, so one scatter store replaces a reduction per slot); the barrier orders the two stores across threads.
    t_ok = t < T
    if WRITE_INVERSE:
        # torch_npu's dropless sorted_indices: row of the j-th routed expert of token t at t*K + j (j < K).
        k_all = tl.arange(0, BLOCK_E)
        fill = t_ok[:, None] & (k_all[None, :] < inverse_k)
        tl.store(inverse_ptr + t[:, None].to(tl.int64) * inverse_k + k_all[None, :], -1, mask=fill)
    if WRITE_LIST:
        # The first LIST_W rows of each token (ascending expert) and its row count: data kernels then load a token's
        # rows (and weights) with LIST_W scalar loads instead of scanning all E experts.
        w_all = tl.arange(0, LIST_W)
        fill = t_ok[:, None] & (w_all[None, :] < LIST_W)
        tl.store(list_ptr + t[:, None].to(tl.int64) * LIST_W + w_all[None, :], -1, mask=fill)
        if LIST_WEIGHTS:
            tl.store(list_w_ptr + t[:, None].to(tl.int64) * LIST_W + w_all[None, :], 0.0, mask=fill)
        has_i = has_row.to(tl.int32)
        tl.store(count_ptr + t, tl.sum(has_i, axis=1), mask=t_ok)
    tl.debug_barrier()
    if WRITE_INVERSE:
        j = tl.cumsum(routed_i, axis=1) - 1
        hit = routed & (j < inverse_k) & mask
        tl.store(inverse_ptr + t[:, None].to(tl.int64) * inverse_k + j, row, mask=hit)
    if WRITE_LIST:
        j = tl.cumsum(has_i, axis=1) - 1
        hit = has_row & (j < LIST_W)
        tl.store(list_ptr + t[:, None].to(tl.int64) * LIST_W + j, row, mask=hit)
        if LIST_WEIGHTS:
            tl.store(list_w_ptr + t[:, None].to(tl.int64) * LIST_W + j, p.to(list_w_ptr.dtype.element_ty), mask=hit)


# ---------------------------------------------------------------------------------------------------------------------
# Kernels: data movement over the dense row map
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _token_rows(rows_ptr, t, E, num_rows, BLOCK_E: tl.constexpr):
    """Row of every pair of token t, whether it is valid, and its rank among the token's valid rows."""
    e = tl.arange(0, BLOCK_E)
    rows = tl.load(rows_ptr + t * E + e, mask=e < E, other=-1)
    valid = (rows >= 0) & (rows < num_rows)
    valid_i = valid.to(tl.int32)
    return rows, valid, tl.cumsum(valid_i, axis=0) - 1, tl.sum(valid_i, axis=0)


@triton.jit
def _dispatch(
    x_ptr,
    list_ptr,
    count_ptr,
    rows_ptr,
    out_ptr,
    H,
    E,
    num_rows,
    stride_x,
    stride_out,
    LIST_W: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[r] = x[t] for every row r of token t: x is read once and written once per copy."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    x = tl.load(x_ptr + t * stride_x + h, mask=h < H)
    for k in tl.static_range(LIST_W):  # unrolled: all index loads, then all stores, in flight together
        r = tl.load(list_ptr + t * LIST_W + k).to(tl.int64)
        cols = tl.where(r >= 0, H, 0)  # a scalar bound masks the whole row (the interpreter rejects scalar & vector)
        # The copies are not read again by this kernel: evict them first and keep x and the lists in L2.
        tl.store(out_ptr + tl.where(r >= 0, r, 0) * stride_out + h, x, mask=h < cols, eviction_policy="evict_first")
    n = tl.load(count_ptr + t)
    if n > LIST_W:  # a token with more rows than the list holds: walk the dense row map for the rest
        rows, valid, pos, _ = _token_rows(rows_ptr, t, E, num_rows, BLOCK_E)
        for j in range(LIST_W, n):
            r = tl.sum(tl.where(valid & (pos == j), rows, 0), axis=0).to(tl.int64)
            tl.store(out_ptr + r * stride_out + h, x, mask=h < H)


@triton.jit
def _combine(
    y_ptr,
    list_ptr,
    count_ptr,
    list_w_ptr,
    rows_ptr,
    w_ptr,
    out_ptr,
    H,
    E,
    num_rows,
    stride_y,
    stride_wt,
    stride_we,
    stride_out,
    HAS_WEIGHTS: tl.constexpr,
    ACC: tl.constexpr,
    LIST_W: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[t] = sum over the rows r of token t (ascending expert) of y[r] * w; ACC accumulation, one store."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_H], dtype=ACC)
    for k in tl.static_range(LIST_W):
        r = tl.load(list_ptr + t * LIST_W + k).to(tl.int64)
        ok = (r >= 0) & (r < num_rows)
        cols = tl.where(ok, H, 0)
        y = tl.load(y_ptr + tl.where(ok, r, 0) * stride_y + h, mask=h < cols, other=0).to(ACC)
        if HAS_WEIGHTS:
            y = y * tl.load(list_w_ptr + t * LIST_W + k).to(ACC)
        acc += y
    n = tl.load(count_ptr + t)
    if n > LIST_W:
        rows, valid, pos, _ = _token_rows(rows_ptr, t, E, num_rows, BLOCK_E)
        if HAS_WEIGHTS:
            e = tl.arange(0, BLOCK_E)
            w = tl.load(w_ptr + t * stride_wt + e * stride_we, mask=e < E, other=0).to(ACC)
        for j in range(LIST_W, n):
            hit = valid & (pos == j)
            r = tl.sum(tl.where(hit, rows, 0), axis=0).to(tl.int64)
            y = tl.load(y_ptr + r * stride_y + h, mask=h < H, other=0).to(ACC)
            if HAS_WEIGHTS:
                y = y * tl.sum(tl.where(hit, w, 0), axis=0)
            acc += y
    tl.store(out_ptr + t * stride_out + h, acc.to(out_ptr.dtype.element_ty), mask=h < H)


@triton.jit
def _combine_backward(
    g_ptr,
    y_ptr,
    list_ptr,
    count_ptr,
    list_w_ptr,
    rows_ptr,
    w_ptr,
    grad_y_ptr,
    dots_ptr,
    H,
    E,
    num_rows,
    stride_g,
    stride_y,
    stride_wt,
    stride_we,
    stride_grad_y,
    HAS_WEIGHTS: tl.constexpr,
    NEED_W_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    LIST_W: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program (t, block of H): grad_y[r] = g[t] * w for every row r of token t (pair (t, e)). With NEED_W_GRAD, the
    block's share of <g[t], y[r]> for the token's first LIST_W rows goes to dots[t, block, :]; `_combine_weights_grad`
    adds the blocks up in a fixed order (deterministic, no atomics). Splitting H keeps every SM busy with independent
    [LIST_W, BLOCK_H] tiles; one program per token looping over H ran at ~1.45x the byte floor on the H200."""
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    g = tl.load(g_ptr + t * stride_g + h, mask=h_ok, other=0).to(ACC)
    j = tl.arange(0, LIST_W)
    r = tl.load(list_ptr + t * LIST_W + j).to(tl.int64)
    ok = (r >= 0) & (r < num_rows)
    r = tl.where(ok, r, 0)
    mask = ok[:, None] & h_ok[None, :]
    gy = tl.broadcast_to(g[None, :], [LIST_W, BLOCK_H])
    if HAS_WEIGHTS:
        gy = gy * tl.load(list_w_ptr + t * LIST_W + j).to(ACC)[:, None]
    tl.store(grad_y_ptr + r[:, None] * stride_grad_y + h[None, :], gy.to(grad_y_ptr.dtype.element_ty), mask=mask)
    if NEED_W_GRAD:
        y = tl.load(y_ptr + r[:, None] * stride_y + h[None, :], mask=mask, other=0).to(ACC)
        tl.store(dots_ptr + (t * tl.num_programs(1) + hb) * LIST_W + j, tl.sum(g[None, :] * y, axis=1))
    n = tl.load(count_ptr + t)
    if n > LIST_W:  # rows past the list (dense maps only): grad_y here, their dot products in the weights kernel
        rows, valid, pos, _ = _token_rows(rows_ptr, t, E, num_rows, BLOCK_E)
        if HAS_WEIGHTS:
            e = tl.arange(0, BLOCK_E)
            w = tl.load(w_ptr + t * stride_wt + e * stride_we, mask=e < E, other=0).to(ACC)
        for jj in range(LIST_W, n):
            hit = valid & (pos == jj)
            rr = tl.sum(tl.where(hit, rows, 0), axis=0).to(tl.int64)
            v = g
            if HAS_WEIGHTS:
                v = g * tl.sum(tl.where(hit, w, 0), axis=0)
            tl.store(grad_y_ptr + rr * stride_grad_y + h, v.to(grad_y_ptr.dtype.element_ty), mask=h_ok)


@triton.jit
def _combine_weights_grad(
    g_ptr,
    y_ptr,
    dots_ptr,
    rows_ptr,
    grad_w_ptr,
    H,
    E,
    num_rows,
    num_blocks,
    stride_g,
    stride_y,
    ACC: tl.constexpr,
    LIST_W: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """grad_w[t, e] = <g[t], y[row of (t, e)]> (0 where the pair has no row), dense over E: the blocks' partial dot
    products for the token's first LIST_W rows, full dot products for the rows past them."""
    t = tl.program_id(0).to(tl.int64)
    rows, valid, pos, n = _token_rows(rows_ptr, t, E, num_rows, BLOCK_E)
    j = tl.arange(0, LIST_W)
    dots = tl.zeros([LIST_W], dtype=ACC)
    for b in range(0, num_blocks):
        dots += tl.load(dots_ptr + (t * num_blocks + b) * LIST_W + j)
    grad_w = tl.zeros([BLOCK_E], dtype=ACC)
    for jj in tl.static_range(LIST_W):
        grad_w += tl.where(valid & (pos == jj), tl.sum(tl.where(j == jj, dots, 0), axis=0), 0)
    for jj in range(LIST_W, n):
        hit = valid & (pos == jj)
        r = tl.sum(tl.where(hit, rows, 0), axis=0).to(tl.int64)
        acc = tl.zeros([BLOCK_H], dtype=ACC)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            g = tl.load(g_ptr + t * stride_g + h, mask=h < H, other=0).to(ACC)
            acc += g * tl.load(y_ptr + r * stride_y + h, mask=h < H, other=0).to(ACC)
        grad_w += tl.where(hit, tl.sum(acc, axis=0), 0)
    e = tl.arange(0, BLOCK_E)
    tl.store(grad_w_ptr + t * E + e, grad_w.to(grad_w_ptr.dtype.element_ty), mask=e < E)


# ---------------------------------------------------------------------------------------------------------------------
# Kernels: token-major row lists (torch_npu's inverse map, or a CSR grouping of a forward map)
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _token_span(ptr_ptr, t, width, HAS_PTR: tl.constexpr):
    """Token t's list entries: [ptr[t], ptr[t+1]) in CSR form, else [t*width, (t+1)*width)."""
    if HAS_PTR:
        return tl.load(ptr_ptr + t), tl.load(ptr_ptr + t + 1)
    return t * width, t * width + width


@triton.jit
def _combine_list(
    y_ptr,
    entries_ptr,
    ptr_ptr,
    w_ptr,
    out_ptr,
    H,
    width,
    num_rows,
    stride_y,
    stride_out,
    HAS_PTR: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[t] = sum over list entries i of token t of y[entries[i]] * w[i]; entries outside [0, num_rows) skipped.

    Token t's entries are [ptr[t], ptr[t+1]) with HAS_PTR (CSR), else [t*width, (t+1)*width)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    start, end = _token_span(ptr_ptr, t, width, HAS_PTR)
    acc = tl.zeros([BLOCK_H], dtype=ACC)
    for i in range(start, end):
        r = tl.load(entries_ptr + i).to(tl.int64)
        ok = (r >= 0) & (r < num_rows)
        # An invalid row masks every column (a scalar bound; the interpreter mishandles scalar & vector masks).
        cols = tl.where(ok, H, 0)
        y = tl.load(y_ptr + tl.where(ok, r, 0) * stride_y + h, mask=h < cols, other=0).to(ACC)
        if HAS_WEIGHTS:
            y = y * tl.load(w_ptr + i).to(ACC)
        acc += y
    tl.store(out_ptr + t * stride_out + h, acc.to(out_ptr.dtype.element_ty), mask=h < H)


@triton.jit
def _combine_list_backward(
    g_ptr,
    y_ptr,
    entries_ptr,
    ptr_ptr,
    w_ptr,
    grad_y_ptr,
    grad_w_ptr,
    H,
    width,
    num_rows,
    stride_g,
    stride_y,
    stride_grad_y,
    HAS_PTR: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    NEED_W_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """grad_y[entries[i]] = g[t] * w[i], grad_w[i] = <g[t], y[entries[i]]> for the list entries i of token t."""
    t = tl.program_id(0).to(tl.int64)
    start, end = _token_span(ptr_ptr, t, width, HAS_PTR)
    for i in range(start, end):
        r = tl.load(entries_ptr + i).to(tl.int64)
        ok = (r >= 0) & (r < num_rows)
        r = tl.where(ok, r, 0)
        cols = tl.where(ok, H, 0)  # an invalid row masks every column
        if HAS_WEIGHTS:
            wi = tl.load(w_ptr + i).to(ACC)
        dot = tl.zeros([BLOCK_H], dtype=ACC)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            g = tl.load(g_ptr + t * stride_g + h, mask=h < H, other=0).to(ACC)
            gy = g * wi if HAS_WEIGHTS else g
            tl.store(grad_y_ptr + r * stride_grad_y + h, gy.to(grad_y_ptr.dtype.element_ty), mask=h < cols)
            if NEED_W_GRAD:
                dot += g * tl.load(y_ptr + r * stride_y + h, mask=h < cols, other=0).to(ACC)
        if NEED_W_GRAD:
            tl.store(grad_w_ptr + i, tl.sum(dot, axis=0).to(grad_w_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


def _block_h(hidden: int) -> int:
    return min(2048, next_pow2(max(hidden, 16)))


_TILE = 8192  # elements of one [copies, H] tile per program


def _tile(hidden: int, block_w: int, tile: int = _TILE) -> tuple[int, int]:
    """(BLOCK_H, num_warps) for a [block_w, BLOCK_H] tile."""
    block_h = max(16, min(next_pow2(max(hidden, 1)), tile // block_w))
    return block_h, 8 if block_w * block_h >= 8192 else 4 if block_w * block_h >= 1024 else 2


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


@dataclass
class PairRows:
    """Routing metadata of one permute: where every (token, expert) pair goes, and the per-row outputs asked for.

    `token_rows`/`row_count`/`token_weights` are the token-major view the data kernels read: the first `list_width`
    rows of each token in ascending expert order (-1 padded), how many rows the token has in all, and (for a combine)
    the prob of each listed pair. Tokens with more rows than `list_width` are finished from `row_of_pair`.
    """

    row_of_pair: torch.Tensor  # [T, E] int32, -1 where a pair has no row
    token_rows: torch.Tensor  # [T, list_width] int32
    row_count: torch.Tensor  # [T] int32
    list_width: int
    token_weights: Optional[torch.Tensor] = None  # [T, list_width], accumulation dtype
    token_of_row: Optional[torch.Tensor] = None  # [num_rows], the forward map
    permuted_probs: Optional[torch.Tensor] = None  # [num_rows]
    inverse: Optional[torch.Tensor] = None  # [T * K] int32, torch_npu's dropless sorted_indices


def _route_counts(routing_map: torch.Tensor, block_t: int):
    """Exclusive per-chunk offsets `[chunks, E]` and totals `[E]` of routed tokens per expert (launches 1 and 2)."""
    num_tokens, num_experts = routing_map.shape
    num_chunks = triton.cdiv(num_tokens, block_t)
    counts = torch.empty((num_chunks, num_experts), dtype=torch.int32, device=routing_map.device)
    totals = torch.empty((num_experts,), dtype=torch.int32, device=routing_map.device)
    # One warp per [block_t, <=256] tile: the column sums then need no cross-warp reduction through shared memory
    # (H200, T=16k: 13 -> 2.5 us at E=256, 5.0 -> 2.2 at E=128; 4 and 8 warps were the slowest).
    block_e = min(256, next_pow2(num_experts))
    launcher(_column_counts, routing_map)[(num_chunks, triton.cdiv(num_experts, block_e))](
        routing_map,
        counts,
        num_tokens,
        num_experts,
        *routing_map.stride(),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        num_warps=1,
    )
    # Few experts per program and many chunks per tile: the scan is latency-bound, so spread it over programs.
    block_e = min(4, next_pow2(num_experts))
    launcher(_scan_chunks, routing_map)[(triton.cdiv(num_experts, block_e),)](
        counts, totals, num_chunks, num_experts, BLOCK_C=min(1024, next_pow2(num_chunks)), BLOCK_E=block_e
    )
    return counts, totals


def _chunk_tokens(num_tokens, num_experts: int) -> int:
    """Tokens per chunk of the row-map launches: ~T/256 chunks' worth, so that a small batch still spreads over a few
    hundred programs (each one's latency, not bandwidth, sets the time), at most a [BLOCK_T, BLOCK_E] tile of 4K
    entries (the large-T choice: 1K-4K entries and 4 or 8 warps within 15%). H200, pair_rows with probs and token map
    at E=256: T=64 8.3 -> 4.3 us, T=512 9.1 -> 5.5, T=2048 9.8 -> 8.1; from T=4096 (E=256) the tile is as before.
    A tuning choice: read from the size hint, no guard, so a dynamic T does not recompile."""
    cap = max(1, min(64, 4096 // next_pow2(num_experts)))
    tokens = size_hint(num_tokens)
    return cap if tokens is None else min(cap, next_pow2(-(-tokens // 256)))


def list_width(num_rows, num_tokens, num_experts) -> int:
    """Rows per token the compact list holds: the average (K for a top-k routing), a power of two, at most 16.

    A tuning choice only (tokens with more rows are finished from the dense map), so it reads size hints and adds
    no guard: a compiled graph does not recompile when T or the row count changes."""
    rows, tokens = size_hint(num_rows), size_hint(num_tokens)
    per_token = 8 if rows is None or tokens is None else -(-rows // max(tokens, 1))
    return max(1, min(16, next_pow2(per_token), next_pow2(num_experts)))


def pair_rows(
    routing_map: torch.Tensor,
    num_rows,
    *,
    capacity: Optional[int] = None,
    probs: Optional[torch.Tensor] = None,
    list_weights: Optional[torch.Tensor] = None,
    token_dtype: Optional[torch.dtype] = None,
    inverse_k: Optional[int] = None,
) -> PairRows:
    """The row map of a permute with `num_rows` rows (drop-and-pad when `capacity` is given), by counting sort.

    `probs` asks for the permuted probs (one per row), `list_weights` (a dense `[T, E]` map) for the weight of every
    listed pair, `token_dtype` for the forward map, `inverse_k` for torch_npu's dropless inverse map."""
    num_tokens, num_experts = routing_map.shape
    device = routing_map.device
    block_t = _chunk_tokens(num_tokens, num_experts)
    counts, totals = _route_counts(routing_map, block_t)
    if num_rows is None:  # Megatron's masked_select form: as many rows as routed pairs (a host sync, like Megatron)
        num_rows = int(totals.sum())
    width = list_width(num_rows, num_tokens, num_experts)
    out = PairRows(
        row_of_pair=torch.empty((num_tokens, num_experts), dtype=torch.int32, device=device),
        token_rows=torch.empty((num_tokens, width), dtype=torch.int32, device=device),
        row_count=torch.empty((num_tokens,), dtype=torch.int32, device=device),
        list_width=width,
    )
    if list_weights is not None:
        out.token_weights = torch.empty((num_tokens, width), dtype=acc_dtype(list_weights.dtype), device=device)
    if token_dtype is not None:
        out.token_of_row = torch.empty((num_rows,), dtype=token_dtype, device=device)
    if probs is not None:
        out.permuted_probs = torch.empty((num_rows,), dtype=probs.dtype, device=device)
    if inverse_k is not None:
        out.inverse = torch.empty((num_tokens * inverse_k,), dtype=torch.int32, device=device)
    if num_tokens == 0:
        return out
    values = probs if probs is not None else list_weights
    dummy = out.row_of_pair
    launcher(_pair_rows, routing_map)[(triton.cdiv(num_tokens, block_t),)](
        routing_map,
        values if values is not None else dummy,
        counts,
        totals,
        out.row_of_pair,
        out.token_of_row if out.token_of_row is not None else dummy,
        out.permuted_probs if out.permuted_probs is not None else dummy,
        out.inverse if out.inverse is not None else dummy,
        out.token_rows,
        out.row_count,
        out.token_weights if out.token_weights is not None else dummy,
        num_tokens,
        num_experts,
        num_rows,
        capacity if capacity is not None else 0,
        inverse_k or 0,
        *routing_map.stride(),
        *(values.stride() if values is not None else (0, 0)),
        PAD=capacity is not None,
        HAS_PROBS=probs is not None,
        WRITE_TOKENS=token_dtype is not None,
        WRITE_INVERSE=inverse_k is not None,
        WRITE_LIST=True,
        LIST_WEIGHTS=list_weights is not None,
        LIST_W=width,
        BLOCK_T=block_t,
        BLOCK_E=next_pow2(num_experts),
    )
    return out


def _supported(routing_map: torch.Tensor) -> bool:
    """Shapes the kernels take: int32 ranks and one tile of experts per program. Anything else (never seen in MoE
    layers) runs the reference."""
    num_tokens, num_experts = routing_map.shape
    return num_tokens * max(num_experts, 1) <= _INT32_MAX and num_experts <= 4096


def dispatch_rows(tokens: torch.Tensor, rows: PairRows, num_rows) -> torch.Tensor:
    """`out[r] = tokens[t]` for every row r of token t, into `num_rows` rows (every row must be some pair's)."""
    num_tokens, hidden = tokens.shape
    tokens = tokens if tokens.stride(-1) == 1 else tokens.contiguous()
    out = tokens.new_empty((num_rows, hidden))
    if num_tokens == 0 or hidden == 0 or guard_or_false(num_rows == 0):
        return out
    num_experts = rows.row_of_pair.shape[1]
    # H200 sweep (dsv3, qwen3, mixtral): 2048 columns and 8 warps with evict-first stores was the best or within 1%.
    block_h, warps = min(2048, next_pow2(max(hidden, 16))), 8 if hidden >= 2048 else 4
    launcher(_dispatch, tokens)[(num_tokens, triton.cdiv(hidden, block_h))](
        tokens,
        rows.token_rows,
        rows.row_count,
        rows.row_of_pair,
        out,
        hidden,
        num_experts,
        num_rows,
        tokens.stride(0),
        out.stride(0),
        LIST_W=rows.list_width,
        BLOCK_E=next_pow2(num_experts),
        BLOCK_H=block_h,
        num_warps=warps,
    )
    return out


def combine_rows(y: torch.Tensor, rows: PairRows, weights: Optional[torch.Tensor], num_tokens):
    """`out[t] = sum over the rows r of token t of y[r] * weights[t, e]` (float32 accumulation, ascending e, one
    rounding). With `weights`, `rows` must carry `token_weights` (`pair_rows(..., list_weights=weights)`)."""
    num_rows, hidden = y.shape
    y = y if y.stride(-1) == 1 else y.contiguous()
    out = y.new_empty((num_tokens, hidden))
    if num_tokens == 0 or hidden == 0:
        return out
    num_experts = rows.row_of_pair.shape[1]
    block_h, warps = _tile(hidden, 1, tile=4096)
    launcher(_combine, y)[(num_tokens, triton.cdiv(hidden, block_h))](
        y,
        rows.token_rows,
        rows.row_count,
        rows.token_weights if weights is not None else y,
        rows.row_of_pair,
        weights if weights is not None else y,
        out,
        hidden,
        num_experts,
        num_rows,
        y.stride(0),
        *(weights.stride() if weights is not None else (0, 0)),
        out.stride(0),
        HAS_WEIGHTS=weights is not None,
        ACC=_tl_acc(y.dtype),
        LIST_W=rows.list_width,
        BLOCK_E=next_pow2(num_experts),
        BLOCK_H=block_h,
        num_warps=warps,
    )
    return out


def combine_rows_backward(grad_out, y, rows: PairRows, weights, need_weights_grad: bool):
    """Grads of `combine_rows`: `grad_y [rows, H]` and the dense `[T, E]` grad of `weights` (or None)."""
    num_rows, hidden = y.shape
    num_tokens, num_experts = rows.row_of_pair.shape
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    y = y if y.stride(-1) == 1 else y.contiguous()
    # Every row below T * E belongs to exactly one pair and gets written; rows past that (malformed) stay zero.
    exact = guard_or_false(num_rows <= num_tokens * num_experts)  # unknown (data-dependent): zero-fill, stay safe
    grad_y = y.new_empty((num_rows, hidden)) if exact else y.new_zeros((num_rows, hidden))
    grad_w = None
    if need_weights_grad:
        grad_w = torch.empty((num_tokens, num_experts), dtype=weights.dtype, device=y.device)
    if num_tokens == 0:
        return grad_y, grad_w
    width = rows.list_width
    # [W, BLOCK_H] tiles of ~8K elements, at most 1024 columns: 1024 for K = 8 (the H200 sweep's best at dsv3, qwen3
    # and mixtral, with 4 warps).
    block_h = min(_tile(hidden, width)[0], 1024)
    num_blocks = triton.cdiv(max(hidden, 1), block_h)
    dots = None
    if need_weights_grad:
        dots = torch.empty((num_tokens, num_blocks, width), dtype=acc_dtype(y.dtype), device=y.device)
    block_e = next_pow2(num_experts)
    launcher(_combine_backward, y)[(num_tokens, num_blocks)](
        grad_out,
        y,
        rows.token_rows,
        rows.row_count,
        rows.token_weights if weights is not None else y,
        rows.row_of_pair,
        weights if weights is not None else y,
        grad_y,
        dots if dots is not None else y,
        hidden,
        num_experts,
        num_rows,
        grad_out.stride(0),
        y.stride(0),
        *(weights.stride() if weights is not None else (0, 0)),
        grad_y.stride(0),
        HAS_WEIGHTS=weights is not None,
        NEED_W_GRAD=need_weights_grad,
        ACC=_tl_acc(y.dtype),
        LIST_W=width,
        BLOCK_E=block_e,
        BLOCK_H=block_h,
        num_warps=4,
    )
    if need_weights_grad:
        launcher(_combine_weights_grad, y)[(num_tokens,)](
            grad_out,
            y,
            dots,
            rows.row_of_pair,
            grad_w,
            hidden,
            num_experts,
            num_rows,
            num_blocks,
            grad_out.stride(0),
            y.stride(0),
            ACC=_tl_acc(y.dtype),
            LIST_W=width,
            BLOCK_E=block_e,
            BLOCK_H=min(next_pow2(max(hidden, 16)), 1024),
            num_warps=4,
        )
    return grad_y, grad_w


@dataclass
class RowList:
    """Token-major list of rows: token t owns entries [ptr[t], ptr[t+1]) (or [t*width, (t+1)*width) without ptr)."""

    entries: torch.Tensor  # row ids (-1 / out of range: skipped)
    weights: Optional[torch.Tensor] = None  # one per entry, or None
    pairs: Optional[torch.Tensor] = None  # the (expert, token) pair each weight came from, `e * T + t` (-1: none)
    ptr: Optional[torch.Tensor] = None
    width: int = 0


def rows_by_token(dest: torch.Tensor, num_tokens) -> RowList:
    """Group the rows of a forward map (token of each row, invalid = none) by token, ascending row within a token.

    A stable sort keeps the reference's summation order (ascending row)."""
    dest = dest.to(torch.int64)
    keys = torch.where(valid_rows(dest, num_tokens), dest, num_tokens)
    order = torch.sort(keys, stable=True).indices
    counts = torch.zeros(num_tokens + 1, dtype=torch.int64, device=dest.device)
    counts.scatter_add_(0, keys, torch.ones_like(keys))
    ptr = torch.cat([counts.new_zeros(1), counts[:num_tokens].cumsum(0)])
    return RowList(entries=order, ptr=ptr)


def combine_list(y: torch.Tensor, rows: RowList, num_tokens) -> torch.Tensor:
    num_rows, hidden = y.shape
    y = y if y.stride(-1) == 1 else y.contiguous()
    out = y.new_empty((num_tokens, hidden))
    if num_tokens == 0 or hidden == 0:
        return out
    block_h = _block_h(hidden)
    launcher(_combine_list, y)[(num_tokens, triton.cdiv(hidden, block_h))](
        y,
        rows.entries,
        rows.ptr if rows.ptr is not None else rows.entries,
        rows.weights if rows.weights is not None else y,
        out,
        hidden,
        rows.width,
        num_rows,
        y.stride(0),
        out.stride(0),
        HAS_PTR=rows.ptr is not None,
        HAS_WEIGHTS=rows.weights is not None,
        ACC=_tl_acc(y.dtype),
        BLOCK_H=block_h,
        num_warps=_warps(block_h),
    )
    return out


def combine_list_backward(grad_out, y, rows: RowList, need_weights_grad: bool):
    """Grads of `combine_list`: `grad_y` (zero for rows no token lists) and one weight grad per entry (float32)."""
    num_rows, hidden = y.shape
    num_tokens = grad_out.shape[0]
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    y = y if y.stride(-1) == 1 else y.contiguous()
    grad_y = torch.zeros_like(y)
    grad_w = torch.zeros(rows.entries.shape, dtype=acc_dtype(y.dtype), device=y.device) if need_weights_grad else None
    if num_tokens == 0 or rows.entries.numel() == 0:
        return grad_y, grad_w
    block_h = min(1024, next_pow2(max(hidden, 16)))
    launcher(_combine_list_backward, y)[(num_tokens,)](
        grad_out,
        y,
        rows.entries,
        rows.ptr if rows.ptr is not None else rows.entries,
        rows.weights if rows.weights is not None else y,
        grad_y,
        grad_w if grad_w is not None else y,
        hidden,
        rows.width,
        num_rows,
        grad_out.stride(0),
        y.stride(0),
        grad_y.stride(0),
        HAS_PTR=rows.ptr is not None,
        HAS_WEIGHTS=rows.weights is not None,
        NEED_W_GRAD=need_weights_grad,
        ACC=_tl_acc(y.dtype),
        BLOCK_H=block_h,
        num_warps=_warps(block_h),
    )
    return grad_y, grad_w


# ---------------------------------------------------------------------------------------------------------------------
# The ops (same signatures as reference.permutation)
# ---------------------------------------------------------------------------------------------------------------------


def moe_token_permute_with_routing_map(tokens, routing_map, probs, num_out_tokens, drop_and_pad):
    if not _supported(routing_map):
        return ref.moe_token_permute_with_routing_map(tokens, routing_map, probs, num_out_tokens, drop_and_pad)
    num_tokens, num_experts = routing_map.shape
    if drop_and_pad:
        capacity = ref.npu_capacity(num_tokens, num_experts, num_out_tokens)
        num_rows = num_experts * capacity
        rows = pair_rows(routing_map, num_rows, capacity=capacity, probs=probs, token_dtype=torch.int32)
        sorted_indices = rows.token_of_row
    else:
        topk = ref.npu_topk(num_tokens, num_out_tokens)
        num_rows = num_tokens * topk
        rows = pair_rows(routing_map, num_rows, probs=probs, inverse_k=topk)
        sorted_indices = rows.inverse
    permuted = dispatch_rows(tokens, rows, num_rows)
    return permuted, rows.permuted_probs, sorted_indices


def permute(tokens, routing_map, probs, num_out_tokens, drop_and_pad):
    if not _supported(routing_map):
        return ref.permute(tokens, routing_map, probs, num_out_tokens, drop_and_pad)
    num_tokens, num_experts = routing_map.shape
    capacity = None
    num_rows = num_out_tokens
    if drop_and_pad and num_out_tokens is not None:
        capacity = ref.megatron_capacity(num_tokens, num_experts, num_out_tokens)
        num_rows = num_experts * capacity
    rows = pair_rows(routing_map, num_rows, capacity=capacity, probs=probs, token_dtype=torch.int64)
    permuted = dispatch_rows(tokens, rows, rows.token_of_row.shape[0])
    return permuted, rows.permuted_probs, rows.token_of_row


def permute_backward(grad_permuted, grad_permuted_probs, routing_map, num_rows, drop_and_pad):
    """(grad tokens, grad probs) of either permute, from the routing map and the permute's row count."""
    if not _supported(routing_map):
        return ref.permute_backward(grad_permuted, grad_permuted_probs, routing_map, num_rows, drop_and_pad)
    num_tokens, num_experts = routing_map.shape
    capacity = num_rows // max(num_experts, 1) if drop_and_pad else None
    rows = pair_rows(routing_map, num_rows, capacity=capacity)
    row_of_pair = rows.row_of_pair
    grad_tokens = grad_probs = None
    if grad_permuted is not None:
        grad_tokens = combine_rows(grad_permuted, rows, None, num_tokens)
    if grad_permuted_probs is not None:
        # Each pair's row grad (zero for pairs without a row); a gather, fused by Inductor under compile.
        grad_probs = gather_rows(grad_permuted_probs, row_of_pair.reshape(-1).long()).view(num_tokens, num_experts)
    return grad_tokens, grad_probs


def _unpermute_plan(permuted, sorted_indices, probs, routing_map, num_tokens, drop_and_pad, megatron: bool):
    """How to combine: ("dense", PairRows) when the routing map names every row's pair, else ("list", RowList) with
    the weight of each entry and the pair it came from (what the backward scatters probs grads to)."""
    num_rows = permuted.shape[0]
    if megatron and not drop_and_pad and probs is not None and _supported(routing_map):
        return "dense", pair_rows(routing_map, num_rows, list_weights=probs)
    if not megatron and not drop_and_pad:
        # torch_npu dropless: sorted_indices is already token-major (row of the j-th routed expert of t at t*K + j).
        topk = ref.npu_topk(num_tokens, sorted_indices.shape[0])
        rows = RowList(entries=sorted_indices, width=topk)
        if probs is not None:
            experts = ref.routed_experts(routing_map, topk).reshape(-1)
            token = torch.arange(experts.shape[0], device=experts.device) // max(topk, 1)
            listed = (experts >= 0) & valid_rows(sorted_indices.long(), num_rows)
            rows.pairs = torch.where(listed, experts * num_tokens + token, -1)
    else:
        # A forward map: token of each row; drop-and-pad rows know their expert from their slot.
        rows = rows_by_token(sorted_indices, num_tokens)
        if probs is not None:
            if drop_and_pad:
                row_pairs = ref.pad_pairs_from_tokens(sorted_indices, num_tokens, probs.shape[1])
            else:
                row_pairs = ref.dropless_pairs(routing_map, num_rows)
            rows.pairs = row_pairs[rows.entries]
    if rows.pairs is not None:
        rows.weights = ref.pair_probs(probs, rows.pairs)
    return "list", rows


def _unpermute(permuted, sorted_indices, restore_shape, probs, routing_map, drop_and_pad, megatron):
    num_tokens = restore_shape[0]
    kind, plan = _unpermute_plan(permuted, sorted_indices, probs, routing_map, num_tokens, drop_and_pad, megatron)
    if kind == "dense":
        return combine_rows(permuted, plan, probs, num_tokens)
    return combine_list(permuted, plan, num_tokens)


def _unpermute_backward(grad_out, permuted, sorted_indices, probs, routing_map, drop_and_pad, need_probs_grad, mega):
    num_tokens = grad_out.shape[0]
    kind, plan = _unpermute_plan(permuted, sorted_indices, probs, routing_map, num_tokens, drop_and_pad, mega)
    if kind == "dense":
        return combine_rows_backward(grad_out, permuted, plan, probs, need_probs_grad)
    grad_permuted, grad_w = combine_list_backward(grad_out, permuted, plan, need_probs_grad)
    grad_probs = None
    if need_probs_grad:
        # Per-entry grads back to the dense [T, E] probs, through the pairs the weights came from.
        grad_probs = ref.scatter_pair_grads(grad_w, plan.pairs, num_tokens, probs.shape[1], probs.dtype)
    return grad_permuted, grad_probs


def moe_token_unpermute_with_routing_map(permuted, sorted_indices, restore_shape, probs, routing_map, drop_and_pad):
    return _unpermute(permuted, sorted_indices, restore_shape, probs, routing_map, drop_and_pad, megatron=False)


def unpermute(permuted, sorted_indices, restore_shape, probs, routing_map, drop_and_pad):
    return _unpermute(permuted, sorted_indices, restore_shape, probs, routing_map, drop_and_pad, megatron=True)


def moe_token_unpermute_backward(grad_out, permuted, sorted_indices, probs, routing_map, drop_and_pad, need_probs):
    return _unpermute_backward(grad_out, permuted, sorted_indices, probs, routing_map, drop_and_pad, need_probs, False)


def unpermute_backward(grad_out, permuted, sorted_indices, probs, routing_map, drop_and_pad, need_probs):
    return _unpermute_backward(grad_out, permuted, sorted_indices, probs, routing_map, drop_and_pad, need_probs, True)
