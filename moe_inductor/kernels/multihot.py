"""Triton kernels for top-k ids <-> dense multihot maps (SPEC §1); same functions as `reference.multihot`.

Each program owns a tile of its output, so nothing needs atomics. The backward and the inverse direction are gathers
that write every element once; the forward zeroes its own tile and scatters into it. Ids (or positions) outside
the valid range are skipped; no address is ever formed from an unchecked id.

* `indices_to_multihot`: one launch, grid `(cdiv(T, BLOCK_T), cdiv(L, BLOCK_L))`. A program zeroes its
  `[BLOCK_T, BLOCK_L]` tiles of both maps, then stores 1 / the prob at the (at most K per token) columns its ids
  name. The only exception to "each element written once": the scattered hits overwrite zeros of the same program,
  ordered by a barrier.
* `indices_to_multihot_backward`: `[T, K]` tile, gathers `grad_probs_map[t, indices[t, k]]` (0 when skipped).
* `multihot_to_indices`: `[T, topk]` tile. Scanning its tokens' `[T, L]` positions in chunks of BLOCK_E columns, a
  program finds, for each slot k, the column whose position is k (a max over a `[BLOCK_T, BLOCK_E, BLOCK_K]` compare),
  then gathers `probs_map` at that column. A copy, not a sum: the result is bitwise the reference's (-0.0 included).
* `multihot_to_indices_backward`: `[T, L]` tile, gathers `grad_probs[t, position_map[t, e]]` (0 where skipped).
* `position_map_from_indices`: like the forward, writing the slot k that matched (-1 elsewhere).

Inputs may be non-contiguous (strides are passed; autograd hands over stride-0 expanded grads); outputs are fresh
contiguous tensors. Token offsets are int64, so `t * L` may exceed 2**31. Block sizes are constexpr heuristics of
the static sizes (L, K), never of T, so a dynamic token count under torch.compile does not recompile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launcher, next_pow2

# Output elements per program: 16 x 256 tiles at L=256 give ~1k programs for T=16k, a few waves of 4-warp CTAs.
_TILE = 4096
_MAX_BLOCK_L = 256
# indices_to_multihot: small [BLOCK_T, L] tiles, one per few tokens; at T=16k, L=256 (4-token tiles) the zero-fill
# then runs near write bandwidth (H200: 8 us vs 18 us for a 16-token tile of K compares per element).
_SCATTER_TILE = 1024


def _row_tile(num_cols: int, tile: int = _TILE) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_C) for a `[T, num_cols]` output tile of about `tile` elements."""
    block_c = min(next_pow2(num_cols), _MAX_BLOCK_L)
    return max(tile // block_c, 1), block_c


# ---------------------------------------------------------------------------------------------------------------------
# indices_to_multihot (+ position map)
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _indices_to_multihot_kernel(
    ids_ptr,
    probs_ptr,
    map_ptr,
    probs_map_ptr,
    T,
    L,
    stride_it,
    stride_ik,
    stride_pt,
    stride_pk,
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    t_ok = t < T
    # A bool pointer is stored as bytes of 0/1 (Triton lowers i1 memory to i8), which is torch's bool layout.
    # Zero the tile, then scatter the (at most K) hits of each token into it: T*E + T*K stores instead of T*E*K
    # compares. The barrier orders the two stores to one address when they come from different threads.
    offs = t[:, None] * L + e[None, :]
    mask = t_ok[:, None] & (e[None, :] < L)
    tl.store(map_ptr + offs, tl.zeros((BLOCK_T, BLOCK_L), dtype=tl.int1), mask=mask)
    tl.store(probs_map_ptr + offs, tl.zeros((BLOCK_T, BLOCK_L), dtype=probs_map_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()
    k = tl.arange(0, BLOCK_K)
    live = t_ok[:, None] & (k[None, :] < K)
    ids = tl.load(ids_ptr + t[:, None] * stride_it + k[None, :] * stride_ik, mask=live, other=-1).to(tl.int64)
    p = tl.load(probs_ptr + t[:, None] * stride_pt + k[None, :] * stride_pk, mask=live, other=0)
    # Ids outside this program's columns (-1, foreign ids >= L, other column blocks) are skipped; no address is
    # formed from them. A repeated id (invalid input) keeps its last k, deterministically.
    col0 = tl.program_id(1) * BLOCK_L
    hit = (ids >= col0) & (ids < col0 + BLOCK_L) & (ids < L)
    later = tl.sum(((ids[:, :, None] == ids[:, None, :]) & (k[None, None, :] > k[None, :, None])).to(tl.int32), 2)
    hit = hit & (later == 0)
    hit_offs = t[:, None] * L + tl.where(hit, ids, 0)
    tl.store(map_ptr + hit_offs, tl.full((BLOCK_T, BLOCK_K), True, dtype=tl.int1), mask=hit)
    tl.store(probs_map_ptr + hit_offs, p, mask=hit)


@triton.jit
def _position_map_kernel(
    ids_ptr,
    pos_ptr,
    T,
    L,
    stride_it,
    stride_ik,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    t_ok = t < T
    pos = tl.full((BLOCK_T, BLOCK_L), -1, dtype=tl.int64)
    for k in tl.static_range(K):
        ids = tl.load(ids_ptr + t * stride_it + k * stride_ik, mask=t_ok, other=-1)
        pos = tl.where(ids[:, None] == e[None, :], k, pos)
    mask = t_ok[:, None] & (e[None, :] < L)
    tl.store(pos_ptr + t[:, None] * L + e[None, :], pos, mask=mask)


def _launch_indices_to_multihot(indices, probs, routing_map, probs_map) -> None:
    """Fill the contiguous `[T, L]` outputs `routing_map` (bool) and `probs_map` (split out as a test hook)."""
    num_tokens, topk = indices.shape
    num_experts = routing_map.shape[1]
    if num_tokens == 0:
        return
    block_t, block_l = _row_tile(num_experts, _SCATTER_TILE)
    block_t = min(block_t, 32)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(num_experts, block_l))
    launcher(_indices_to_multihot_kernel, indices)[grid](
        indices,
        probs,
        routing_map,
        probs_map,
        num_tokens,
        num_experts,
        indices.stride(0),
        indices.stride(1),
        probs.stride(0),
        probs.stride(1),
        K=int(topk),
        BLOCK_K=next_pow2(topk),
        BLOCK_T=block_t,
        BLOCK_L=block_l,
        num_warps=2 if block_t * block_l <= 1024 else 4,
    )


def indices_to_multihot(indices: torch.Tensor, probs: torch.Tensor, num_local_experts: int):
    """`routing_map[t, e]` / `probs_map[t, e]` from `indices[t, k] == e`; ids outside `[0, L)` are skipped."""
    shape = (indices.shape[0], num_local_experts)
    routing_map = torch.empty(shape, dtype=torch.bool, device=indices.device)
    probs_map = torch.empty(shape, dtype=probs.dtype, device=probs.device)
    _launch_indices_to_multihot(indices, probs, routing_map, probs_map)
    return routing_map, probs_map


def position_map_from_indices(indices: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """The position map of SPEC §1: `k` at `[t, indices[t, k]]` for routed entries, -1 elsewhere (int64)."""
    num_tokens, topk = indices.shape
    out = torch.empty((num_tokens, num_local_experts), dtype=torch.int64, device=indices.device)
    if num_tokens == 0:
        return out
    block_t, block_l = _row_tile(num_local_experts)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(num_local_experts, block_l))
    launcher(_position_map_kernel, indices)[grid](
        indices,
        out,
        num_tokens,
        num_local_experts,
        indices.stride(0),
        indices.stride(1),
        K=int(topk),
        BLOCK_T=block_t,
        BLOCK_L=block_l,
        num_warps=4,
    )
    return out


# ---------------------------------------------------------------------------------------------------------------------
# indices_to_multihot backward: gather from the [T, L] grad map
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _gather_cols_kernel(
    src_ptr,
    cols_ptr,
    out_ptr,
    T,
    N_SRC,
    N_OUT,
    stride_st,
    stride_sc,
    stride_ct,
    stride_cc,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """`out[t, j] = src[t, cols[t, j]]` for `0 <= cols[t, j] < N_SRC`, else 0; `out` is contiguous `[T, N_OUT]`."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (t < T)[:, None] & (j < N_OUT)[None, :]
    cols = tl.load(cols_ptr + t[:, None] * stride_ct + j[None, :] * stride_cc, mask=mask, other=-1)
    ok = mask & (cols >= 0) & (cols < N_SRC)
    # Skipped entries load nothing (the masked-off address is never dereferenced) and become 0.
    src = src_ptr + t[:, None] * stride_st + cols.to(tl.int64) * stride_sc
    val = tl.load(src, mask=ok, other=0)
    tl.store(out_ptr + t[:, None] * N_OUT + j[None, :], val, mask=mask)


def _gather_cols(src: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`out[t, j] = src[t, cols[t, j]]` (0 where `cols` is outside `[0, src.shape[1])`), shaped like `cols`."""
    num_tokens, n_out = cols.shape
    out = torch.empty((num_tokens, n_out), dtype=src.dtype, device=src.device)
    if num_tokens == 0 or n_out == 0:
        return out
    block_t, block_c = _row_tile(n_out)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(n_out, block_c))
    launcher(_gather_cols_kernel, src)[grid](
        src,
        cols,
        out,
        num_tokens,
        src.shape[1],
        n_out,
        src.stride(0),
        src.stride(1),
        cols.stride(0),
        cols.stride(1),
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return out


def indices_to_multihot_backward(grad_probs_map: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`grad_probs[t, k] = grad_probs_map[t, indices[t, k]]` for routed entries, 0 for skipped ones."""
    return _gather_cols(grad_probs_map, indices)


# ---------------------------------------------------------------------------------------------------------------------
# multihot_to_indices (+ backward)
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _multihot_to_indices_kernel(
    probs_map_ptr,
    pos_ptr,
    out_ptr,
    T,
    L,
    TOPK,
    stride_vt,
    stride_vl,
    stride_pt,
    stride_pl,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.arange(0, BLOCK_K)
    t_ok = t < T
    # col[t, k]: the column whose position is k, -1 if none (the max picks one if the input repeats a position).
    col = tl.full((BLOCK_T, BLOCK_K), -1, dtype=tl.int32)
    for e0 in range(0, L, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        m = t_ok[:, None] & (e < L)[None, :]
        pos = tl.load(pos_ptr + t[:, None] * stride_pt + e[None, :] * stride_pl, mask=m, other=-1)
        hit = pos[:, :, None] == k[None, None, :]
        col = tl.maximum(col, tl.max(tl.where(hit, e[None, :, None], -1), axis=1))
    out_mask = t_ok[:, None] & (k < TOPK)[None, :]
    # Gather, not a sum over the hits: a bitwise copy of probs_map, -0.0 and NaN included.
    src = probs_map_ptr + t[:, None] * stride_vt + col.to(tl.int64) * stride_vl
    val = tl.load(src, mask=out_mask & (col >= 0), other=0)
    tl.store(out_ptr + t[:, None] * TOPK + k[None, :], val, mask=out_mask)


def multihot_to_indices(probs_map: torch.Tensor, position_map: torch.Tensor, topk: int) -> torch.Tensor:
    """`probs[t, position_map[t, e]] = probs_map[t, e]` where the position is in `[0, topk)`; 0 elsewhere."""
    num_tokens, num_experts = probs_map.shape
    out = torch.empty((num_tokens, topk), dtype=probs_map.dtype, device=probs_map.device)
    if num_tokens == 0:
        return out
    # The [BLOCK_T, BLOCK_E, BLOCK_K] compare stays around _TILE elements (BLOCK_E = 32 at topk 8).
    block_k = next_pow2(topk)
    block_t = max(min(16, _TILE // block_k), 1)
    block_e = max(min(next_pow2(num_experts), _TILE // (block_t * block_k)), 1)
    grid = (triton.cdiv(num_tokens, block_t),)
    launcher(_multihot_to_indices_kernel, probs_map)[grid](
        probs_map,
        position_map,
        out,
        num_tokens,
        num_experts,
        topk,
        probs_map.stride(0),
        probs_map.stride(1),
        position_map.stride(0),
        position_map.stride(1),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return out


def multihot_to_indices_backward(grad_probs: torch.Tensor, position_map: torch.Tensor) -> torch.Tensor:
    """`grad_probs_map[t, e] = grad_probs[t, position_map[t, e]]`, 0 where the position is -1."""
    return _gather_cols(grad_probs, position_map)
