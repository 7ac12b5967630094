"""Row-map primitives that every reference kernel is built from.

A *row map* is an int64 vector with one entry per row of a permuted buffer: the source row it is gathered from, or
the output row it is added into. An entry that is negative or past the end means "no row": gathers produce a zero
row and scatters drop the value. That convention is what lets every op accept `-1` ids and malformed routing
without ever touching memory outside its buffers.

Everything here is plain, vectorised torch with shapes that depend only on input shapes, so the same functions serve
as CPU kernels (real tensors) and inside autograd formulas that `torch.compile` traces with symbolic shapes.
Accumulations run in float32 (float64 inputs stay float64) and, on CPU, in ascending row order: deterministic, and
bitwise equal to an eager `scatter_add_`/`index_add_` over the same rows.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for 16/32-bit floats, float64 kept (gradcheck runs in float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_rows(rows: torch.Tensor, n) -> torch.Tensor:
    return (rows >= 0) & (rows < n)


def sink(rows: torch.Tensor, n) -> torch.Tensor:
    """`rows` with every invalid entry redirected to `n`, a scratch slot one past the end of the target."""
    return torch.where(valid_rows(rows, n), rows, n)


def gather_rows(src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`out[r] = src[rows[r]]`, a zero row where `rows[r]` is invalid."""
    n = src.shape[0]
    out_shape = (rows.shape[0],) + tuple(src.shape[1:])
    if guard_or_false(n == 0):
        return src.new_zeros(out_shape)
    ok = valid_rows(rows, n)
    picked = src.index_select(0, torch.where(ok, rows, 0))
    zero = torch.zeros((), dtype=src.dtype, device=src.device)
    return torch.where(ok.view((-1,) + (1,) * (src.dim() - 1)), picked, zero)


def scatter_add_rows(values: torch.Tensor, rows: torch.Tensor, n) -> torch.Tensor:
    """`out[rows[r]] += values[r]` into `n` zero rows, in ascending `r`; invalid rows are dropped."""
    out = values.new_zeros((n + 1,) + tuple(values.shape[1:]))
    out.index_add_(0, sink(rows, n), values)
    return out[:n]


def scatter_rows(values: torch.Tensor, rows: torch.Tensor, n, fill) -> torch.Tensor:
    """`out[rows[r]] = values[r]` into a length-`n` vector filled with `fill`; `rows` must not repeat valid entries."""
    out = torch.full((n + 1,) + tuple(values.shape[1:]), fill, dtype=values.dtype, device=values.device)
    # Invalid entries all land on the scratch slot; which of them wins there does not matter.
    out.index_copy_(0, sink(rows, n), values)
    return out[:n]


def true_first_rank(mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Position of every entry of a bool `mask` in a stable sort (along `dim`) that puts True before False.

    This is `mask.argsort(dim, descending=True, stable=True).argsort(dim)` computed with two prefix sums instead of
    a sort: Trues keep their order at the front, Falses keep theirs behind them.
    """
    as_int = mask.to(torch.int64)
    n_true = as_int.sum(dim, keepdim=True)
    rank_true = as_int.cumsum(dim) - 1
    rank_false = n_true + (1 - as_int).cumsum(dim) - 1
    return torch.where(mask, rank_true, rank_false)


def invert_rank(rank: torch.Tensor, n_rows) -> torch.Tensor:
    """Rows `[0, n_rows)` of the permutation whose inverse is `rank` (a 1-D permutation of its indices).

    `out[r]` = the index `i` with `rank[i] == r`, or -1 where no index lands on `r`.
    """
    index = torch.arange(rank.shape[0], device=rank.device, dtype=torch.int64)
    return scatter_rows(index, rank, n_rows, -1)
