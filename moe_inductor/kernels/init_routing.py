"""Triton kernels for moe_init_routing_v2 and moe_finalize_routing (SPEC §4, §4b): same functions, arguments and
outputs as `moe_inductor.reference.init_routing`.

moe_init_routing_v2, four launches (one more below K = 4, one more with drop/pad), no host sync, no sort:

1. `_hist_kernel`, one program per chunk of `CHUNK` flat copies `j = t*K + k`: key = expert id - start (out of
   range -> no key); `hist[c, e]` = copies of expert e in chunk c, by `tl.histogram` (warp ballots).
2. `_scan_kernel`, one program per few experts: `tl.cumsum` down `[BLOCK_C, BLOCK_E]` tiles of `hist` turns it
   into the exclusive per-expert prefix over chunks (in place); the column totals are the expert counts.
3. `_offsets_kernel`, one program: the exclusive cumsum of the counts (each expert's first row), the in-range total
   and the cumsum / key-value count outputs.
4. The data movement, token-major: each program first ranks its token's K copies (`_write_copy_rows`; below K = 4
   a `_rank_kernel` launch over blocks of copies does it instead, see `_ranks_inline`): the stable
   counting-sort rank of a copy is `expert offset + chunk prefix + same-key copies earlier in its chunk` (compares
   with the chunk's keys; the offset and prefix are one load each). It writes the row of every copy
   (`expanded_row_idx` for row_idx_type 0 and drop/pad, where the rank within the expert is cut at the capacity)
   and the scatter form for row_idx_type 1. Then it reads the token's row (block) of `x` once and writes its K
   copies to those rows. `_expand_kernel` (grid `[N, H / BLOCK_H]`) copies (quant_mode -1, with the per-token scale)
   or quantises statically (0); `_dynamic_quant_kernel` (grid `[N]`) fuses dynamic int8 quantisation: with no or a
   `[1, H]` smooth scale the token is quantised once and stored K times; with per-expert smooth scales each copy has
   its own amax. A row of up to `_ROW_TILE` columns is held in registers; longer rows take two passes over H
   (amax, then quantise), re-reading the row. Dropless rows past the in-range total (copies of experts outside the
   range, -1 ids) are zeroed here too, by the program of token `row // K`.
5. drop/pad only: `_zero_rows_kernel` zeroes the empty slots past each expert's count (and their scale). Programs
   whose rows are all filled return after one load.

moe_finalize_routing: one `_finalize_kernel`, program per (token, H block), gathers its K rows in k order
(-1 / out-of-range rows drop the whole term), adds the expert bias, multiplies by the scale, accumulates in fp32,
adds the skips, stores once. Backward: `_mark_rows_kernel` flags referenced rows, `_finalize_bwd_kernel` (program per
token) writes `grad_out * scale` to each referenced row and reduces `grad_scales`, `_zero_rows_kernel` zeroes the
rows nobody references (no full memset of the gradient). The bias gradient is a per-expert `index_add` done with
the reference's torch code. moe_init_routing_v2_backward: `_gather_copies_kernel` sums the K copies of each token
(fp32, k order); scatter-form row indices are inverted first by `_invert_kernel`.

Block sizes are fixed heuristics (no autotuning): CHUNK = 128 copies, a constant so that a
symbolic N is not specialised; histogram bins min(max(next_pow2(E'), 32), 1024) per pass; BLOCK_H = min(next_pow2(H),
1024) for copies, finalize and backward (4 warps); dynamic quant takes the whole row (next_pow2(H) <= 8192, a warp
per 1K columns: `_quant_warps`). Offsets of rows into `[rows, H]` buffers are int64.

Exactness: integer outputs, int8 and scales equal the reference bit for bit. The reference's `torch.round` is
round-half-even (`cvt.rni` on GPU, floor arithmetic in the interpreter); divisions are IEEE: `div_rn`, or on GPU for
the dynamic quantisation one reciprocal per row and an FMA-corrected product per element, which gives the same
correctly rounded quotient (`_quantise` says when; a GPU test checks it over every bf16 value); products that feed
an add are an inline `mul.rn.f32` on GPU, never contracted into an FMA (torch rounds the product).
Float results add the K terms in k order, in fp32, with one final rounding: the reference's operations in the same
order, except that torch's `sum` over K does not always add in k order (then they agree to summation order).

Falls back to the reference for: empty inputs (no tokens, K = 0, H = 0), float64 finalize rows and float64
gradients (gradcheck; Triton accumulates in fp32), and for the bias gradient of finalize (index_add).
Duplicate rows in a finalize index are invalid input (rows then get one of the copies, not their sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.fx.experimental.symbolic_shapes import guard_or_false
from triton.runtime.jit import JITFunction

from ..reference import init_routing as ref
from ._launch import launcher, next_pow2

# Tile sizes (module level so tests can shrink them to reach every loop with small shapes).
_MAX_BLOCK_E = 128  # experts per offsets tile
_MIN_BINS, _MAX_BINS = 32, 1024  # tl.histogram bins per pass: a multiple of the warp size (its lowering asserts it)
# Copies per histogram chunk, a constant (N may be symbolic): a copy's rank compares it with the earlier copies of
# its chunk, so chunks stay short; with tl.histogram more chunks cost little (hist 23 us -> 2.8 at 131k copies).
_CHUNK = 128
_RANK_BLOCK = 32  # copies per `_rank_kernel` program
_SCAN_CHUNKS, _SCAN_EXPERTS = 1024, 4  # [chunks, experts] per cumsum tile
_MAX_BLOCK_H = 1024  # hidden columns per program / tile
_ROW_TILE = 8192  # dynamic quant holds a whole row in registers up to this many columns
_ZERO_ROWS = 16  # rows per zero-fill program

_NO_SMOOTH, _SHARED_SMOOTH, _EXPERT_SMOOTH = 0, 1, 2
_ZERO_EMPTY_SLOTS, _ZERO_UNFLAGGED = 1, 2


def _exact(kernel) -> bool:
    """Compiled kernels need `_mul`'s inline `mul.rn` to keep products out of FMAs; the interpreter never fuses."""
    return isinstance(kernel, JITFunction)


def _is_empty(*sizes) -> bool:
    return any(guard_or_false(s == 0) for s in sizes)


def _warps(block: int) -> int:
    return 8 if block >= 8192 else 4


def _quant_warps(block_h: int, one_tile: bool) -> int:
    """Warps of the dynamic-quant kernel: ~1K columns per warp when the row is one tile. Its row amax is a reduction
    across warps, which fewer warps make cheaper (H200, 16k tokens, K = 8: H=512 65 -> 27 us, H=1024 65 -> 47,
    H=1536 74 -> 68, H=2048 91 -> 90; 4096 and 7168 unchanged at 4 and 8 warps). Two-pass rows (H > 8192): 8 warps,
    was 4 (H=16384: 219 -> 214 us)."""
    return max(1, min(8, block_h // 1024)) if one_tile else 8


# ---------------------------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _mul(a, b, EXACT: tl.constexpr):
    # torch rounds a product before adding it; a compiled a*b+c may become one FMA (one rounding). PTX never contracts
    # a mul with an explicit rounding mode (libdevice's mul_rn would flush subnormals: mul.rn.ftz).
    if EXACT:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return a * b


@triton.jit
def _round_half_even(x):
    # torch.round; libdevice.rint is unavailable in the interpreter. On |x|, x - floor(x) is exact (Sterbenz for
    # |x| >= 1, floor = 0 below), so ties are detected exactly; |x| >= 2**23 is already an integer (d = 0).
    a = tl.abs(x)
    f = tl.floor(a)
    d = a - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    r = tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
    return tl.where(x < 0, -r, r)


@triton.jit
def _rint(x, FAST: tl.constexpr):
    # torch.round (half to even): one `cvt.rni` on GPU, floor arithmetic in the interpreter.
    if FAST:
        return tl.inline_asm_elementwise("cvt.rni.f32.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return _round_half_even(x)


@triton.jit
def _dynamic_scale(amax):
    ds = tl.math.div_rn(amax, 127.0)  # torch: amax / 127.0, IEEE division
    return ds, tl.where(ds > 0, ds, 1.0)


@triton.jit
def _quantise(xf, ds, safe, FAST: tl.constexpr):
    """int8 of torch's `round(x / scale)` (0 where the scale is 0), bit for bit.

    FAST (compiled kernels): `div_rn` per element made the quantising kernel compute-bound (1.5x its byte floor at
    H=4096, K=2). Instead q0 = x * RN(1/s) and one FMA correction q0 + RN(x - q0*s) * RN(1/s): Markstein's theorem
    makes that the correctly rounded quotient while s, 1/s and the remainder stay normal numbers, which the scalar
    range check on s guarantees for every |x| <= 127 s (the remainder is ~ulp(q) * s, and only |q| >= 0.5 can
    round to a nonzero int). Other scales (tiny, huge, inf, nan) take `div_rn`.
    """
    if FAST:
        if (safe >= 7.888609052210118e-31) & (safe <= 1.2676506002282294e30):  # 2**-100 <= s <= 2**100
            inv = tl.math.div_rn(1.0, safe)
            q0 = xf * inv
            q = tl.fma(tl.fma(-q0, safe, xf), inv, q0)
        else:
            q = tl.math.div_rn(xf, safe)
    else:
        q = tl.math.div_rn(xf, safe)
    return tl.where(ds > 0, _rint(q, FAST), 0.0).to(tl.int8)


@triton.jit
def _both(lanes, flag):
    # `lanes & flag` for a scalar flag (the Triton 3.9 interpreter cannot splat a scalar bool into a mask).
    return tl.where(flag, lanes, False)


@triton.jit
def _copy_keys(idx_ptr, j, num_copies, start, num_experts):
    """Key of flat copies `j`: expert id - start, or `num_experts` (matches no expert) when out of range / past end."""
    live = j < num_copies
    key = tl.load(idx_ptr + j, mask=live, other=-1).to(tl.int64) - start
    ok = live & (key >= 0) & (key < num_experts)
    return tl.where(ok, key, num_experts).to(tl.int32)


# ---------------------------------------------------------------------------------------------------------------------
# Routing metadata: counting sort
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _hist_kernel(idx_ptr, hist_ptr, num_copies, start, num_experts, CHUNK: tl.constexpr, BINS: tl.constexpr):
    # tl.histogram (warp ballots) over the chunk's keys, BINS experts at a time; keys past E (no expert) are masked.
    c = tl.program_id(0)
    key = _copy_keys(idx_ptr, c * CHUNK + tl.arange(0, CHUNK), num_copies, start, num_experts)
    for e0 in range(0, num_experts, BINS):
        rel = key - e0
        counts = tl.histogram(rel, BINS, mask=(rel >= 0) & (rel < BINS))
        e = e0 + tl.arange(0, BINS)
        tl.store(hist_ptr + c.to(tl.int64) * num_experts + e, counts, mask=e < num_experts)


@triton.jit
def _scan_kernel(hist_ptr, counts_ptr, num_chunks, num_experts, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    # Exclusive prefix over chunks, per expert, in place: a cumsum down each [BLOCK_C, BLOCK_E] tile plus a carry.
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < num_experts
    carry = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ptrs = hist_ptr + c[:, None] * num_experts + e[None, :]
        ok = (c < num_chunks)[:, None] & e_ok[None, :]
        tile = tl.load(ptrs, mask=ok, other=0)
        tl.store(ptrs, tl.cumsum(tile, axis=0) - tile + carry[None, :], mask=ok)
        carry += tl.sum(tile, axis=0)
    tl.store(counts_ptr + e, carry.to(tl.int64), mask=e_ok)


@triton.jit
def _offsets_kernel(
    counts_ptr,
    offsets_ptr,
    total_ptr,
    count_out_ptr,
    num_experts,
    start,
    expert_num,
    BLOCK_E: tl.constexpr,
    COUNT_OUT: tl.constexpr,  # 0: none here, 1: cumsum, 2: key-value table
):
    """One program: exclusive expert offsets (the first row of each expert), the in-range total, and the cumsum /
    key-value count outputs. Done once here so that every rank program reads its key's offset with one load."""
    run = 0
    nonzero = 0
    for e0 in range(0, num_experts, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_ok = e < num_experts
        cnt = tl.load(counts_ptr + e, mask=e_ok, other=0).to(tl.int32)
        inclusive = tl.cumsum(cnt, axis=0) + run
        tl.store(offsets_ptr + e, inclusive - cnt, mask=e_ok)
        if COUNT_OUT == 1:
            tl.store(count_out_ptr + e, inclusive.to(tl.int64), mask=e_ok)
        if COUNT_OUT == 2:
            has = e_ok & (cnt > 0)
            pos = tl.cumsum(has.to(tl.int32), axis=0) - 1 + nonzero
            tl.store(count_out_ptr + 2 * pos, (e + start).to(tl.int64), mask=has)
            tl.store(count_out_ptr + 2 * pos + 1, cnt.to(tl.int64), mask=has)
            nonzero += tl.sum(has.to(tl.int32), axis=0)
        run += tl.sum(cnt, axis=0)
    tl.store(total_ptr, run)
    if COUNT_OUT == 2:
        # Rows past the experts with tokens are zero.
        for r0 in range(0, expert_num, BLOCK_E):
            r = r0 + tl.arange(0, BLOCK_E)
            pad = (r < expert_num) & (r >= nonzero)
            zero = tl.zeros([BLOCK_E], dtype=tl.int64)
            tl.store(count_out_ptr + 2 * r, zero, mask=pad)
            tl.store(count_out_ptr + 2 * r + 1, zero, mask=pad)


@triton.jit
def _store_copy_rows(
    key,
    before,
    j,
    live,
    offsets_ptr,
    total_ptr,
    row_of_copy_ptr,
    scatter_idx_ptr,
    num_experts,
    num_rows,
    capacity,
    LEAD,
    DROP_PAD: tl.constexpr,
    SCATTER_IDX: tl.constexpr,
):
    """Row of copies j (key, same-key copies `before` them in the stable order) -> `row_of_copy`: the expert's slot
    cut at the capacity (drop/pad), else expert offset + before cut at the row count; with SCATTER_IDX also the
    scatter form, by the LEAD program of the copies."""
    in_range = key < num_experts
    if DROP_PAD:
        row = tl.where(in_range & (before < capacity), key.to(tl.int64) * capacity + before, -1)
    else:
        rank = tl.load(offsets_ptr + key, mask=in_range, other=0) + before
        row = tl.where(in_range & (rank < num_rows), rank, -1)
        if SCATTER_IDX:
            # order[rank] = j for in-range copies; positions past the in-range total are -1 (each written once).
            tl.store(scatter_idx_ptr + rank, j, mask=_both(in_range, LEAD))
            past = live & (j >= tl.load(total_ptr))
            tl.store(scatter_idx_ptr + j, tl.full(j.shape, -1, tl.int32), mask=_both(past, LEAD))
    tl.store(row_of_copy_ptr + j, row.to(tl.int32), mask=live)


@triton.jit
def _write_copy_rows(
    idx_ptr,
    prefix_ptr,
    offsets_ptr,
    total_ptr,
    row_of_copy_ptr,
    scatter_idx_ptr,
    j0,
    count,
    num_copies,
    start,
    num_experts,
    num_rows,
    capacity,
    LEAD,
    CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DROP_PAD: tl.constexpr,
    SCATTER_IDX: tl.constexpr,
):
    """Rows of the `count` copies j0 .. j0+count-1 (a token's K copies), stored to `row_of_copy` (and the scatter
    form when LEAD). The counting-sort rank of a copy is `expert offset + chunk prefix + same-key copies earlier in
    its chunk`; the last term compares the copy with the keys of the chunk window of copy j0 (at most CHUNK - 1 of
    them), or, for a copy past that chunk, with the block's own earlier copies. Done by the data kernel itself from
    K = 4 on (`_ranks_inline`): ~1K compares per token next to moving its row."""
    k = tl.arange(0, BLOCK_K)
    j = j0 + k
    live = (k < count) & (j < num_copies)
    key = tl.where(live, _copy_keys(idx_ptr, j, num_copies, start, num_experts), num_experts)
    in_range = key < num_experts

    chunk = j // CHUNK
    chunk_start = chunk * CHUNK
    first = j0 // CHUNK * CHUNK  # chunk start of copy j0
    w = first + tl.arange(0, CHUNK)
    window = _copy_keys(idx_ptr, w, num_copies, start, num_experts)
    earlier = (w[None, :] < j[:, None]) & (w[None, :] >= chunk_start[:, None]) & (window[None, :] == key[:, None])
    own_start = tl.maximum(chunk_start, first + CHUNK)
    own = (j[None, :] < j[:, None]) & (j[None, :] >= own_start[:, None]) & (key[None, :] == key[:, None])
    before = tl.load(prefix_ptr + chunk * num_experts + key, mask=in_range, other=0)
    before += tl.sum(earlier.to(tl.int32), axis=1) + tl.sum(own.to(tl.int32), axis=1)

    _store_copy_rows(
        key,
        before,
        j,
        live,
        offsets_ptr,
        total_ptr,
        row_of_copy_ptr,
        scatter_idx_ptr,
        num_experts,
        num_rows,
        capacity,
        LEAD,
        DROP_PAD,
        SCATTER_IDX,
    )


@triton.jit
def _rank_kernel(
    idx_ptr,
    prefix_ptr,
    offsets_ptr,
    total_ptr,
    row_of_copy_ptr,
    scatter_idx_ptr,
    num_copies,
    start,
    num_experts,
    num_rows,
    capacity,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    DROP_PAD: tl.constexpr,
    SCATTER_IDX: tl.constexpr,
):
    """Rows of BLOCK copies per program, for data kernels that do not rank their own copies (`_ranks_inline`). Same
    ranks as `_write_copy_rows`, walking the earlier BLOCK-copy blocks of the chunk with `[BLOCK, BLOCK]` compares:
    H200, 131k copies: 10 us, against 29 for one `[BLOCK, CHUNK]` window compare per program."""
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    j = pid * BLOCK + lane
    live = j < num_copies
    key = _copy_keys(idx_ptr, j, num_copies, start, num_experts)
    in_range = key < num_experts

    # Same-key copies before j: earlier chunks (scanned histogram), earlier blocks of this chunk, earlier lanes.
    chunk = (pid * BLOCK) // CHUNK
    before = tl.load(prefix_ptr + chunk * num_experts + key, mask=in_range, other=0)
    for s0 in range(chunk * CHUNK, pid * BLOCK, BLOCK):
        other = _copy_keys(idx_ptr, s0 + lane, num_copies, start, num_experts)
        before += tl.sum((key[:, None] == other[None, :]).to(tl.int32), axis=1)
    before += tl.sum(((key[:, None] == key[None, :]) & (lane[None, :] < lane[:, None])).to(tl.int32), axis=1)

    _store_copy_rows(
        key,
        before,
        j,
        live,
        offsets_ptr,
        total_ptr,
        row_of_copy_ptr,
        scatter_idx_ptr,
        num_experts,
        num_rows,
        capacity,
        True,
        DROP_PAD,
        SCATTER_IDX,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Data movement
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _zero_tail_rows(
    out_ptr, scale_out_ptr, total_ptr, num_rows, t, K, H, cols, span, WITH_SCALE, BLOCK_H: tl.constexpr
):
    """Dropless rows past the in-range total get no copy and must be zero (scale too). Rows t*K .. t*K+K-1 belong
    to token t's program, so the data-movement kernel zeroes them itself: one load of the total when all rows are
    filled (the usual case), instead of a launch over all rows."""
    total = tl.load(total_ptr)
    for k in range(K):
        r = t.to(tl.int64) * K + k
        if (r >= total) & (r < num_rows):
            for h0 in range(0, span, BLOCK_H):  # columns `cols`, shifted by BLOCK_H while below `span`
                c = h0 + cols
                tl.store(out_ptr + r * H + c, tl.zeros([BLOCK_H], dtype=out_ptr.dtype.element_ty), mask=c < H)
            tl.store(scale_out_ptr + r, tl.zeros((), dtype=scale_out_ptr.dtype.element_ty), mask=WITH_SCALE)


@triton.jit
def _expand_kernel(
    x_ptr,
    idx_ptr,
    prefix_ptr,
    offsets_ptr,
    total_ptr,
    row_of_copy_ptr,
    scatter_idx_ptr,
    out_ptr,
    scale_ptr,
    offset_ptr,
    scale_out_ptr,
    num_copies,
    start,
    num_experts,
    num_rows,
    capacity,
    H,
    K,
    scale_stride,
    offset_stride,
    STATIC_QUANT: tl.constexpr,
    TOKEN_SCALE: tl.constexpr,
    ZERO_TAIL: tl.constexpr,
    EXACT: tl.constexpr,
    RANK: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DROP_PAD: tl.constexpr,
    SCATTER_IDX: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Token-major: the block of x is read once and stored to each of the token's K rows. Every column block of a
    # token ranks its copies (the same rows); block 0 writes the scatter form.
    t = tl.program_id(0)
    hb = tl.program_id(1)
    cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    v = tl.load(x_ptr + t.to(tl.int64) * H + cols, mask=col_ok)
    if RANK:
        _write_copy_rows(
            idx_ptr,
            prefix_ptr,
            offsets_ptr,
            total_ptr,
            row_of_copy_ptr,
            scatter_idx_ptr,
            t * K,
            K,
            num_copies,
            start,
            num_experts,
            num_rows,
            capacity,
            hb == 0,
            CHUNK,
            BLOCK_K,
            DROP_PAD,
            SCATTER_IDX,
        )
        tl.debug_barrier()  # the rows, stored by some threads, are loaded by all below
    if ZERO_TAIL:
        _zero_tail_rows(out_ptr, scale_out_ptr, total_ptr, num_rows, t, K, H, cols, 1, hb == 0, BLOCK_H)
    if STATIC_QUANT:
        s = tl.load(scale_ptr + cols * scale_stride, mask=col_ok, other=0).to(tl.float32)
        o = tl.load(offset_ptr + cols * offset_stride, mask=col_ok, other=0).to(tl.float32)
        v = _mul(v.to(tl.float32), s, EXACT) + o
        v = tl.minimum(tl.maximum(_rint(v, EXACT), -128.0), 127.0).to(tl.int8)
    if TOKEN_SCALE:
        token_scale = tl.load(scale_ptr + t)
    else:
        token_scale = 0.0
    for k in range(K):
        row = tl.load(row_of_copy_ptr + t * K + k)
        ok = row >= 0
        tl.store(out_ptr + row.to(tl.int64) * H + cols, v, mask=_both(col_ok, ok), eviction_policy="evict_first")
        tl.store(scale_out_ptr + row, token_scale, mask=ok & (hb == 0))


@triton.jit
def _dynamic_quant_kernel(
    x_ptr,
    idx_ptr,
    prefix_ptr,
    offsets_ptr,
    total_ptr,
    row_of_copy_ptr,
    scatter_idx_ptr,
    smooth_ptr,
    out_ptr,
    scale_out_ptr,
    num_copies,
    start,
    num_experts,
    num_rows,
    capacity,
    H,
    K,
    SMOOTH: tl.constexpr,
    ONE_TILE: tl.constexpr,
    ZERO_TAIL: tl.constexpr,
    FAST: tl.constexpr,
    RANK: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DROP_PAD: tl.constexpr,
    SCATTER_IDX: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    x_row = x_ptr + t.to(tl.int64) * H
    cols = tl.arange(0, BLOCK_H)
    if ONE_TILE:
        xf = tl.load(x_row + cols, mask=cols < H, other=0).to(tl.float32)
    if RANK:
        _write_copy_rows(
            idx_ptr,
            prefix_ptr,
            offsets_ptr,
            total_ptr,
            row_of_copy_ptr,
            scatter_idx_ptr,
            t * K,
            K,
            num_copies,
            start,
            num_experts,
            num_rows,
            capacity,
            True,
            CHUNK,
            BLOCK_K,
            DROP_PAD,
            SCATTER_IDX,
        )
        tl.debug_barrier()  # the rows, stored by some threads, are loaded by all below
    if ZERO_TAIL:
        _zero_tail_rows(out_ptr, scale_out_ptr, total_ptr, num_rows, t, K, H, cols, H, True, BLOCK_H)
    if SMOOTH != 2:
        # One quantisation per token, stored to all K rows.
        if ONE_TILE:
            if SMOOTH == 1:
                xf = xf * tl.load(smooth_ptr + cols, mask=cols < H, other=0).to(tl.float32)
            ds, safe = _dynamic_scale(tl.max(tl.abs(xf), axis=0))
            q = _quantise(xf, ds, safe, FAST)
            for k in range(K):
                row = tl.load(row_of_copy_ptr + t * K + k)
                tl.store(
                    out_ptr + row.to(tl.int64) * H + cols,
                    q,
                    mask=_both(cols < H, row >= 0),
                    eviction_policy="evict_first",  # copies are not read again here: keep x in L2
                )
                tl.store(scale_out_ptr + row, ds, mask=row >= 0)
        else:
            # Row longer than a tile: amax pass, then quantise pass (re-reads the row, from cache).
            amax = 0.0
            for h0 in range(0, H, BLOCK_H):
                c = h0 + cols
                xb = tl.load(x_row + c, mask=c < H, other=0).to(tl.float32)
                if SMOOTH == 1:
                    xb = xb * tl.load(smooth_ptr + c, mask=c < H, other=0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(tl.abs(xb), axis=0))
            ds, safe = _dynamic_scale(amax)
            for h0 in range(0, H, BLOCK_H):
                c = h0 + cols
                xb = tl.load(x_row + c, mask=c < H, other=0).to(tl.float32)
                if SMOOTH == 1:
                    xb = xb * tl.load(smooth_ptr + c, mask=c < H, other=0).to(tl.float32)
                q = _quantise(xb, ds, safe, FAST)
                for k in range(K):
                    row = tl.load(row_of_copy_ptr + t * K + k)
                    tl.store(out_ptr + row.to(tl.int64) * H + c, q, mask=_both(c < H, row >= 0))
            for k in range(K):
                row = tl.load(row_of_copy_ptr + t * K + k)
                tl.store(scale_out_ptr + row, ds, mask=row >= 0)
    else:
        # Per-expert smooth scale: every copy has its own amax.
        for k in range(K):
            row = tl.load(row_of_copy_ptr + t * K + k)
            if row >= 0:
                out_row = out_ptr + row.to(tl.int64) * H
                smooth_row = smooth_ptr + (tl.load(idx_ptr + t * K + k).to(tl.int64) - start) * H
                if ONE_TILE:
                    xs = xf * tl.load(smooth_row + cols, mask=cols < H, other=0).to(tl.float32)
                    ds, safe = _dynamic_scale(tl.max(tl.abs(xs), axis=0))
                    tl.store(out_row + cols, _quantise(xs, ds, safe, FAST), mask=cols < H)
                else:
                    # Two passes over H (amax, then quantise) for this copy's smooth scale.
                    amax = 0.0
                    for h0 in range(0, H, BLOCK_H):
                        c = h0 + cols
                        xb = tl.load(x_row + c, mask=c < H, other=0).to(tl.float32)
                        xb = xb * tl.load(smooth_row + c, mask=c < H, other=0).to(tl.float32)
                        amax = tl.maximum(amax, tl.max(tl.abs(xb), axis=0))
                    ds, safe = _dynamic_scale(amax)
                    for h0 in range(0, H, BLOCK_H):
                        c = h0 + cols
                        xb = tl.load(x_row + c, mask=c < H, other=0).to(tl.float32)
                        xb = xb * tl.load(smooth_row + c, mask=c < H, other=0).to(tl.float32)
                        tl.store(out_row + c, _quantise(xb, ds, safe, FAST), mask=c < H)
                tl.store(scale_out_ptr + row, ds)


@triton.jit
def _zero_rows_kernel(
    out_ptr,
    scale_out_ptr,
    info_ptr,
    num_rows,
    H,
    capacity,
    MODE: tl.constexpr,  # 1: drop/pad slots past count info[expert]; 2: rows with info[r] == 0
    HAS_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < num_rows
    if MODE == 1:
        empty = live & (r % capacity >= tl.load(info_ptr + r // capacity, mask=live, other=0))
    else:
        empty = live & (tl.load(info_ptr + r, mask=live, other=1) == 0)
    if tl.sum(empty.to(tl.int32), axis=0) > 0:
        if HAS_SCALE:
            tl.store(scale_out_ptr + r, tl.zeros([BLOCK_R], dtype=scale_out_ptr.dtype.element_ty), mask=empty)
        zero = tl.zeros([BLOCK_R, BLOCK_H], dtype=out_ptr.dtype.element_ty)
        row_ptr = out_ptr + r.to(tl.int64)[:, None] * H
        for h0 in range(0, H, BLOCK_H):
            c = h0 + tl.arange(0, BLOCK_H)
            tl.store(row_ptr + c[None, :], zero, mask=empty[:, None] & (c < H)[None, :])


# ---------------------------------------------------------------------------------------------------------------------
# moe_init_routing_v2
# ---------------------------------------------------------------------------------------------------------------------


def _ranks_inline(topk: int) -> bool:
    """Whether the data kernel ranks its token's copies itself instead of a rank launch. H200, 16k tokens, int8
    quant (one run): at K = 8 it saves the 10 us launch for ~2 us more in the quantising kernel (dsv3 1.19 -> 1.16x
    floor, qwen3 1.34 -> 1.25); at K = 2 (Mixtral) the launch costs 4 us and inline ranking 6.5 (1.28 -> 1.32)."""
    return topk >= 4


@dataclass
class _Route:
    """What the data kernel needs to rank the copies of its token (launches 1-3 made it)."""

    prefix: torch.Tensor  # [chunks, E'] int32, same-expert copies in earlier chunks
    offsets: torch.Tensor  # [E'] int32, first row of each expert
    total: torch.Tensor  # [1] int32, in-range copies
    row_of_copy: torch.Tensor  # [N*K] int32, written by the data kernel
    scatter_idx: torch.Tensor  # [N*K] int32 for row_idx_type 1 (written by the data kernel), else a read-only dummy
    chunk: int


def _route(expert_idx, start, end, expert_num, scatter_idx, count_kind):
    """Launches 1-3. Returns (_Route, expanded_row_idx int32, counts int64 [E'], count output)."""
    device = expert_idx.device
    num_copies = expert_idx.numel()
    num_experts = end - start
    idx = expert_idx
    chunk = max(_CHUNK, _RANK_BLOCK)
    num_chunks = (num_copies + chunk - 1) // chunk
    block_e = min(next_pow2(num_experts), _MAX_BLOCK_E)

    hist = torch.empty((num_chunks, num_experts), dtype=torch.int32, device=device)
    launcher(_hist_kernel, idx)[(num_chunks,)](
        idx,
        hist,
        num_copies,
        start,
        num_experts,
        CHUNK=chunk,
        BINS=min(max(next_pow2(num_experts), _MIN_BINS), _MAX_BINS),
    )
    counts = torch.empty((num_experts,), dtype=torch.int64, device=device)
    # Latency-bound: few experts per program and all chunks of a shape like dsv3's in one tile.
    scan_e = min(next_pow2(num_experts), _SCAN_EXPERTS)
    launcher(_scan_kernel, idx)[(triton.cdiv(num_experts, scan_e),)](
        hist, counts, num_chunks, num_experts, BLOCK_C=_SCAN_CHUNKS, BLOCK_E=scan_e
    )

    row_of_copy = torch.empty((num_copies,), dtype=torch.int32, device=device)
    expanded_row_idx = torch.empty_like(row_of_copy) if scatter_idx else row_of_copy
    total = torch.empty((1,), dtype=torch.int32, device=device)
    if count_kind == ref.CUMSUM:
        count_out, count_mode = torch.empty((num_experts,), dtype=torch.int64, device=device), 1
    elif count_kind == ref.KEY_VALUE:
        count_out, count_mode = torch.empty((expert_num, 2), dtype=torch.int64, device=device), 2
    else:
        count_out, count_mode = counts, 0
    offsets = torch.empty((num_experts,), dtype=torch.int32, device=device)
    # Unused pointers get the read-only `idx`: an output passed twice would alias under torch.compile's wrap_triton.
    launcher(_offsets_kernel, idx)[(1,)](
        counts,
        offsets,
        total,
        count_out if count_mode else idx,
        num_experts,
        start,
        max(expert_num, 1),
        BLOCK_E=block_e,
        COUNT_OUT=count_mode,
    )
    route = _Route(hist, offsets, total, row_of_copy, expanded_row_idx if scatter_idx else idx, chunk)
    return route, expanded_row_idx, counts, count_out


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
    num_tokens, topk = expert_idx.shape
    hidden = x.shape[1]
    if _is_empty(num_tokens, topk, hidden):
        return ref.moe_init_routing_v2(
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
        )
    expert_idx = expert_idx.contiguous()  # flat copy j = t * K + k
    start, end = ref.expert_range(expert_num, active_expert_range)
    drop_pad = drop_pad_mode == ref.DROP_PAD
    if drop_pad:
        num_rows = (end - start) * expert_capacity
    else:
        num_rows = ref.dropless_rows(num_tokens * topk, active_num)
    scatter_idx = not drop_pad and row_idx_type == ref.SCATTER_ROW_IDX
    count_kind = expert_tokens_num_type if expert_tokens_num_flag else ref.COUNT
    route, expanded_row_idx, counts, count_out = _route(expert_idx, start, end, expert_num, scatter_idx, count_kind)
    # The arguments with which the data kernel ranks its token's copies (`_write_copy_rows`).
    ranking = (expert_idx, route.prefix, route.offsets, route.total, route.row_of_copy, route.scatter_idx)
    sizes = (expert_idx.numel(), start, end - start, num_rows, max(expert_capacity, 1))
    inline = _ranks_inline(topk)
    rank_flags = dict(
        RANK=inline, CHUNK=route.chunk, BLOCK_K=next_pow2(topk), DROP_PAD=drop_pad, SCATTER_IDX=scatter_idx
    )
    if not inline:
        launcher(_rank_kernel, expert_idx)[(triton.cdiv(sizes[0], _RANK_BLOCK),)](
            *ranking, *sizes, CHUNK=route.chunk, BLOCK=_RANK_BLOCK, DROP_PAD=drop_pad, SCATTER_IDX=scatter_idx
        )  # (route.chunk is a multiple of _RANK_BLOCK: the walk starts at a chunk start)
    if not expert_tokens_num_flag:
        count_out = counts.new_empty((0,))

    x = x.contiguous()
    device = x.device
    token_scale = quant_mode == ref.NO_QUANT and scale is not None
    out_dtype = x.dtype if quant_mode == ref.NO_QUANT else torch.int8
    scale_dtype = scale.dtype if token_scale else torch.float32
    expanded_x = torch.empty((num_rows, hidden), dtype=out_dtype, device=device)
    expanded_scale = torch.empty((num_rows,), dtype=scale_dtype, device=device)

    if quant_mode == ref.DYNAMIC_QUANT:
        if scale is None:
            smooth, smooth_mode = x, _NO_SMOOTH
        else:
            smooth = scale.contiguous()
            smooth_mode = _SHARED_SMOOTH if scale.shape[0] == 1 else _EXPERT_SMOOTH
        one_tile = next_pow2(hidden) <= _ROW_TILE
        block_h = next_pow2(hidden) if one_tile else min(_ROW_TILE, 2048)
        launcher(_dynamic_quant_kernel, x)[(num_tokens,)](
            x,
            *ranking,
            smooth,
            expanded_x,
            expanded_scale,
            *sizes,
            hidden,
            topk,
            **rank_flags,
            SMOOTH=smooth_mode,
            ONE_TILE=one_tile,
            ZERO_TAIL=not drop_pad,
            FAST=_exact(_dynamic_quant_kernel),
            BLOCK_H=block_h,
            num_warps=_quant_warps(block_h, one_tile),
        )
    else:
        static = quant_mode == ref.STATIC_QUANT
        scale_in = scale.contiguous() if scale is not None else x
        offset_in = offset.contiguous() if static else x
        scale_stride = int(static and scale.dim() == 2)
        offset_stride = int(static and offset.dim() == 2)
        block_h = min(next_pow2(hidden), _MAX_BLOCK_H)
        kernel = _expand_kernel
        launcher(kernel, x)[(num_tokens, triton.cdiv(hidden, block_h))](
            x,
            *ranking,
            expanded_x,
            scale_in,
            offset_in,
            expanded_scale,
            *sizes,
            hidden,
            topk,
            scale_stride,
            offset_stride,
            **rank_flags,
            STATIC_QUANT=static,
            TOKEN_SCALE=token_scale,
            ZERO_TAIL=not drop_pad,
            EXACT=_exact(kernel),
            BLOCK_H=block_h,
            num_warps=_warps(block_h),
        )

    if drop_pad:
        # Slots past each expert's count received no copy (dropless tail rows were zeroed by the kernel above).
        _zero_rows(expanded_x, expanded_scale, counts, _ZERO_EMPTY_SLOTS, max(expert_capacity, 1))
        expanded_x = expanded_x.view(end - start, expert_capacity, hidden)
    return expanded_x, expanded_row_idx, count_out, expanded_scale


def _zero_rows(rows, scale, info, mode, capacity=1):
    num_rows, hidden = rows.shape
    block_h = min(next_pow2(hidden), 256)
    launcher(_zero_rows_kernel, rows)[(triton.cdiv(num_rows, _ZERO_ROWS),)](
        rows,
        scale if scale is not None else info,
        info,
        num_rows,
        hidden,
        capacity,
        MODE=mode,
        HAS_SCALE=scale is not None,
        BLOCK_R=_ZERO_ROWS,
        BLOCK_H=block_h,
    )


# ---------------------------------------------------------------------------------------------------------------------
# moe_init_routing_v2 backward
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _invert_kernel(scatter_idx_ptr, row_of_copy_ptr, num_copies, num_rows, BLOCK: tl.constexpr):
    # Scatter form lists the copy of each row: row_of_copy[copy] = row, for rows that exist.
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = (p < num_copies) & (p < num_rows)
    j = tl.load(scatter_idx_ptr + p, mask=live, other=-1).to(tl.int64)
    tl.store(row_of_copy_ptr + j, p.to(tl.int32), mask=live & (j >= 0) & (j < num_copies))


@triton.jit
def _gather_copies_kernel(
    grad_ptr,
    grad_scale_ptr,
    row_of_copy_ptr,
    grad_x_ptr,
    grad_token_scale_ptr,
    K,
    H,
    num_rows,
    HAS_SCALE: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    hb = tl.program_id(1)
    cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in range(K):
        row = tl.load(row_of_copy_ptr + t * K + k).to(tl.int64)
        ok = (row >= 0) & (row < num_rows)
        acc += tl.load(grad_ptr + row * H + cols, mask=_both(col_ok, ok), other=0).to(tl.float32)
    tl.store(grad_x_ptr + t.to(tl.int64) * H + cols, acc.to(grad_x_ptr.dtype.element_ty), mask=col_ok)
    if HAS_SCALE:
        if hb == 0:
            gs = 0.0
            for k in range(K):
                row = tl.load(row_of_copy_ptr + t * K + k).to(tl.int64)
                ok = (row >= 0) & (row < num_rows)
                gs += tl.load(grad_scale_ptr + row, mask=ok, other=0).to(tl.float32)
            tl.store(grad_token_scale_ptr + t, gs)


def moe_init_routing_v2_backward(grad_expanded_x, grad_expanded_scale, expanded_row_idx, row_idx_type, topk):
    hidden = grad_expanded_x.shape[-1]
    num_copies = expanded_row_idx.shape[0]
    wide = grad_expanded_x.dtype == torch.float64 or (
        grad_expanded_scale is not None and grad_expanded_scale.dtype == torch.float64
    )
    if wide or _is_empty(num_copies, topk, hidden):
        return ref.moe_init_routing_v2_backward(
            grad_expanded_x, grad_expanded_scale, expanded_row_idx, row_idx_type, topk
        )
    grad_rows = grad_expanded_x.reshape(-1, hidden).contiguous()
    num_rows = grad_rows.shape[0]
    num_tokens = num_copies // topk
    device = grad_rows.device
    row_idx = expanded_row_idx.contiguous()
    if row_idx_type == ref.GATHER_ROW_IDX:
        row_of_copy = row_idx
    else:
        row_of_copy = torch.full((num_copies,), -1, dtype=torch.int32, device=device)
        block = 1024
        launcher(_invert_kernel, row_idx)[(triton.cdiv(num_copies, block),)](
            row_idx, row_of_copy, num_copies, num_rows, BLOCK=block
        )
    grad_x = torch.empty((num_tokens, hidden), dtype=grad_rows.dtype, device=device)
    has_scale = grad_expanded_scale is not None
    grad_scale = torch.empty((num_tokens,), dtype=torch.float32, device=device) if has_scale else None
    gscale_in = grad_expanded_scale.contiguous() if has_scale else grad_rows
    block_h = min(next_pow2(hidden), _MAX_BLOCK_H)
    launcher(_gather_copies_kernel, grad_rows)[(num_tokens, triton.cdiv(hidden, block_h))](
        grad_rows,
        gscale_in,
        row_of_copy,
        grad_x,
        grad_scale if has_scale else grad_rows,
        topk,
        hidden,
        num_rows,
        HAS_SCALE=has_scale,
        BLOCK_H=block_h,
        num_warps=_warps(block_h),
    )
    return grad_x, grad_scale


# ---------------------------------------------------------------------------------------------------------------------
# moe_finalize_routing
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _copy_row(idx_ptr, i, k, N, K, COL_MAJOR: tl.constexpr):
    if COL_MAJOR:
        return tl.load(idx_ptr + k * N + i).to(tl.int64)
    else:
        return tl.load(idx_ptr + i * K + k).to(tl.int64)


@triton.jit
def _finalize_kernel(
    rows_ptr,
    skip1_ptr,
    skip2_ptr,
    bias_ptr,
    scales_ptr,
    idx_ptr,
    expert_ptr,
    out_ptr,
    N,
    K,
    H,
    num_rows,
    num_bias,
    COL_MAJOR: tl.constexpr,
    HAS_SKIP1: tl.constexpr,
    HAS_SKIP2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    EXACT: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in range(K):
        row = _copy_row(idx_ptr, i, k, N, K, COL_MAJOR)
        if (row >= 0) & (row < num_rows):
            term = tl.load(rows_ptr + row * H + cols, mask=col_ok, other=0).to(tl.float32)
            if HAS_BIAS:
                e = tl.load(expert_ptr + i * K + k).to(tl.int64)
                e_ok = (e >= 0) & (e < num_bias)
                term += tl.load(bias_ptr + e * H + cols, mask=_both(col_ok, e_ok), other=0).to(tl.float32)
            if HAS_SCALES:
                term = _mul(term, tl.load(scales_ptr + i * K + k).to(tl.float32), EXACT)
            acc += term
    token = i.to(tl.int64) * H + cols
    if HAS_SKIP1:
        acc += tl.load(skip1_ptr + token, mask=col_ok, other=0).to(tl.float32)
    if HAS_SKIP2:
        acc += tl.load(skip2_ptr + token, mask=col_ok, other=0).to(tl.float32)
    tl.store(out_ptr + token, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def _finalize_rows(expanded_permuted_rows):
    hidden = expanded_permuted_rows.shape[-1]
    return expanded_permuted_rows.reshape(-1, hidden).contiguous()


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
    num_copies = expanded_src_to_dst_row.shape[0]
    if expanded_permuted_rows.dtype == torch.float64 or _is_empty(num_copies, hidden):
        return ref.moe_finalize_routing(
            expanded_permuted_rows,
            skip1,
            skip2,
            bias,
            scales,
            expanded_src_to_dst_row,
            expert_for_source_row,
            drop_pad_mode,
            topk,
        )
    rows = _finalize_rows(expanded_permuted_rows)
    num_tokens = num_copies // topk
    out = torch.empty((num_tokens, hidden), dtype=rows.dtype, device=rows.device)
    block_h = min(next_pow2(hidden), _MAX_BLOCK_H)

    def arg(t):  # unused pointers get a read-only input
        return t.contiguous() if t is not None else rows

    kernel = _finalize_kernel
    launcher(kernel, rows)[(num_tokens, triton.cdiv(hidden, block_h))](
        rows,
        arg(skip1),
        arg(skip2),
        arg(bias),
        arg(scales),
        expanded_src_to_dst_row.contiguous(),
        arg(expert_for_source_row),
        out,
        num_tokens,
        topk,
        hidden,
        rows.shape[0],
        bias.shape[0] if bias is not None else 0,
        COL_MAJOR=drop_pad_mode in ref.COLUMN_MAJOR_MODES,
        HAS_SKIP1=skip1 is not None,
        HAS_SKIP2=skip2 is not None,
        HAS_BIAS=bias is not None,
        HAS_SCALES=scales is not None,
        EXACT=_exact(kernel),
        BLOCK_H=block_h,
        num_warps=_warps(block_h),
    )
    return out


# ---------------------------------------------------------------------------------------------------------------------
# moe_finalize_routing backward
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _mark_rows_kernel(idx_ptr, flag_ptr, num_copies, num_rows, BLOCK: tl.constexpr):
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = p < num_copies
    row = tl.load(idx_ptr + p, mask=live, other=-1).to(tl.int64)
    ok = live & (row >= 0) & (row < num_rows)
    tl.store(flag_ptr + row, tl.full([BLOCK], 1, tl.int8), mask=ok)


@triton.jit
def _finalize_bwd_kernel(
    grad_out_ptr,
    rows_ptr,
    bias_ptr,
    scales_ptr,
    idx_ptr,
    expert_ptr,
    grad_rows_ptr,
    grad_scales_ptr,
    N,
    K,
    H,
    num_rows,
    num_bias,
    COL_MAJOR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    NEED_ROWS: tl.constexpr,
    NEED_SCALES: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Token-major: grad_out[i] is read once per H block; each referenced row gets grad_out[i] * scale[i, k].
    i = tl.program_id(0)
    ks = tl.arange(0, BLOCK_K)
    grad_scales = tl.zeros([BLOCK_K], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        g = tl.load(grad_out_ptr + i.to(tl.int64) * H + cols, mask=col_ok, other=0).to(tl.float32)
        for k in range(K):
            row = _copy_row(idx_ptr, i, k, N, K, COL_MAJOR)
            if (row >= 0) & (row < num_rows):
                if NEED_ROWS:
                    w = g
                    if HAS_SCALES:
                        w = g * tl.load(scales_ptr + i * K + k).to(tl.float32)
                    tl.store(grad_rows_ptr + row * H + cols, w.to(grad_rows_ptr.dtype.element_ty), mask=col_ok)
                if NEED_SCALES:
                    term = tl.load(rows_ptr + row * H + cols, mask=col_ok, other=0).to(tl.float32)
                    if HAS_BIAS:
                        e = tl.load(expert_ptr + i * K + k).to(tl.int64)
                        e_ok = (e >= 0) & (e < num_bias)
                        term += tl.load(bias_ptr + e * H + cols, mask=_both(col_ok, e_ok), other=0).to(tl.float32)
                    grad_scales = tl.where(ks == k, grad_scales + tl.sum(term * g, axis=0), grad_scales)
    if NEED_SCALES:
        tl.store(grad_scales_ptr + i * K + ks, grad_scales.to(grad_scales_ptr.dtype.element_ty), mask=ks < K)


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
    hidden = expanded_permuted_rows.shape[-1]
    num_copies = expanded_src_to_dst_row.shape[0]
    wide = torch.float64 in (grad_out.dtype, expanded_permuted_rows.dtype)
    if wide or _is_empty(num_copies, hidden):
        return ref.moe_finalize_routing_backward(
            grad_out,
            expanded_permuted_rows,
            bias,
            scales,
            expanded_src_to_dst_row,
            expert_for_source_row,
            drop_pad_mode,
            topk,
            need_rows_grad,
            need_bias_grad,
            need_scales_grad,
        )
    rows = _finalize_rows(expanded_permuted_rows)
    num_rows = rows.shape[0]
    num_tokens = grad_out.shape[0]
    device = rows.device
    idx = expanded_src_to_dst_row.contiguous()
    grad_out_c = grad_out.contiguous()

    grad_rows = grad_scales = grad_bias = None
    if need_rows_grad or need_scales_grad:
        if need_rows_grad:
            grad_rows = torch.empty_like(rows)
        if need_scales_grad:
            grad_scales = torch.empty((num_tokens, topk), dtype=scales.dtype, device=device)

        def arg(t):
            return t.contiguous() if t is not None else rows

        block_h = min(next_pow2(hidden), _MAX_BLOCK_H)
        launcher(_finalize_bwd_kernel, rows)[(num_tokens,)](
            grad_out_c,
            rows,
            arg(bias),
            arg(scales),
            idx,
            arg(expert_for_source_row),
            arg(grad_rows),
            arg(grad_scales),
            num_tokens,
            topk,
            hidden,
            num_rows,
            bias.shape[0] if bias is not None else 0,
            COL_MAJOR=drop_pad_mode in ref.COLUMN_MAJOR_MODES,
            HAS_BIAS=bias is not None,
            HAS_SCALES=scales is not None,
            NEED_ROWS=need_rows_grad,
            NEED_SCALES=need_scales_grad,
            BLOCK_H=block_h,
            BLOCK_K=next_pow2(topk),
            num_warps=_warps(block_h),
        )
    if need_rows_grad:
        # Rows no copy points at get a zero gradient: flag the referenced rows, zero the rest.
        flags = torch.zeros((num_rows,), dtype=torch.int8, device=device)
        block = 1024
        launcher(_mark_rows_kernel, idx)[(triton.cdiv(num_copies, block),)](
            idx, flags, num_copies, num_rows, BLOCK=block
        )
        _zero_rows(grad_rows, None, flags, _ZERO_UNFLAGGED)
        grad_rows = grad_rows.view(expanded_permuted_rows.shape)
    if need_bias_grad:
        # Per-expert sum of grad_out * scale: the reference's index_add (torch), not a Triton kernel.
        _, grad_bias, _ = ref.moe_finalize_routing_backward(
            grad_out,
            expanded_permuted_rows,
            bias,
            scales,
            expanded_src_to_dst_row,
            expert_for_source_row,
            drop_pad_mode,
            topk,
            need_rows_grad=False,
            need_bias_grad=True,
            need_scales_grad=False,
        )
    return grad_rows, grad_bias, grad_scales
