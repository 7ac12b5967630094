"""Triton grouped matmul against a float64 per-group loop, forward and backward pieces.

On CPU the kernels run in Triton's interpreter with 16x16x16 tiles and 3 persistent programs (see
kernels/grouped_matmul.py), so the small shapes here cross tile, K-step and group boundaries, and every program walks
several groups. The split-M, split-K and bad-group-list tests run twice (`loads`): with pointer loads, and with TMA
tensor descriptors forced on in the interpreter (a 16-row tail tile on split M). Outputs are poisoned before the
kernel writes them (tests/poison.py): an unwritten element or a write past the end fails. On a GPU the same
comparisons run at BENCH.md expert shapes (test_gmm_cuda_matches_loop).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from oracles import GMM_TOL as TOL
from oracles import gmm_loop
from poison import interpreted_module
from samples import rand

kernels = pytest.importorskip("moe_inductor.kernels.grouped_matmul")

SPLIT_M = [
    pytest.param([5, 0, 17, 1, 9], 37, id="empty_and_one_row_groups_tail_rows"),
    pytest.param([0, 0, 0], 4, id="all_empty"),
    pytest.param([33], 33, id="one_group"),
    pytest.param([40, 2], 42, id="exact_total"),
    pytest.param([3, 4], 0 + 7, id="smaller_than_a_tile"),
]


def _ends(sizes):
    return list(itertools.accumulate(sizes))


def _group_list(sizes, cumulative):
    return torch.tensor(_ends(sizes) if cumulative else sizes, dtype=torch.int64)


@pytest.fixture(params=["pointers", "tma"])
def loads(request, monkeypatch):
    """Pointer loads (19 x 23 K and N: no 16-byte aligned strides, so never TMA), or TMA tensor descriptors forced
    on in the interpreter with 24 x 40 (aligned strides; a partial K step and a partial column tile all the same)."""
    if request.param == "tma":
        monkeypatch.setenv("MOE_INDUCTOR_GMM_TMA", "1")
        return request.param, 24, 40
    return request.param, 19, 23


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sizes,M", SPLIT_M)
@pytest.mark.parametrize("transposed", [False, True], ids=["w_gkn", "w_gnk_view"])
@pytest.mark.parametrize("cumulative", [True, False], ids=["ends", "counts"])
def test_split_m(monkeypatch, loads, sizes, M, dtype, transposed, cumulative):
    module, poisoned = interpreted_module("moe_inductor.kernels.grouped_matmul", monkeypatch)
    G = len(sizes)
    mode, K, N = loads  # K: one full and one partial 16-step; N: two or three column tiles, the last partial
    x = rand(M, K, dtype=dtype, seed=1)
    w = rand(G, N, K, dtype=dtype, seed=2).transpose(1, 2) if transposed else rand(G, K, N, dtype=dtype, seed=2)
    assert (module._tma_layout(x, w, 0) is not None) == (mode == "tma")
    bias_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    bias = rand(G, N, dtype=bias_dtype, seed=3)
    for b in (None, bias):
        y = module.gmm(x, w, b, _group_list(sizes, cumulative), 0, cumulative)
        assert y.dtype == dtype and y.shape == (M, N)
        torch.testing.assert_close(y.double(), gmm_loop(x, w, b, _ends(sizes), 0), **TOL[dtype])
        assert not y[_ends(sizes)[-1] :].any()  # rows past the last group are written as zeros
    poisoned.check_guards()


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cumulative", [True, False], ids=["ends", "counts"])
@pytest.mark.parametrize(
    "sizes", [pytest.param([4, 0, 23, 1], id="empty_one_and_multi_step"), pytest.param([0, 7], id="leading_empty")]
)
def test_split_k(monkeypatch, loads, sizes, dtype, cumulative):
    module, poisoned = interpreted_module("moe_inductor.kernels.grouped_matmul", monkeypatch)
    mode = loads[0]
    M, N = (21, 18) if mode == "pointers" else (24, 40)  # TMA: 16-byte aligned rows of x_t and w
    Ktot = sum(sizes) + 3  # columns past the last group are ignored
    x, w = rand(M, Ktot, dtype=dtype, seed=4), rand(Ktot, N, dtype=dtype, seed=5)
    # x as the backward passes it: a transposed view (the contraction axis is the token axis); only it can use TMA
    x_t = rand(Ktot, M, dtype=dtype, seed=4).t()
    assert module._tma_layout(x, w, 2) is None
    assert (module._tma_layout(x_t, w, 2) is not None) == (mode == "tma")
    for a in (x, x_t):
        y = module.gmm(a, w, None, _group_list(sizes, cumulative), 2, cumulative)
        assert y.shape == (len(sizes), M, N)
        torch.testing.assert_close(y.double(), gmm_loop(a, w, None, _ends(sizes), 2), **TOL[dtype])
        for g, n in enumerate(sizes):
            if n == 0:
                assert not y[g].any()
    poisoned.check_guards()


@pytest.mark.interpreter
@pytest.mark.parametrize("cumulative", [True, False], ids=["ends", "counts"])
def test_bias_grad(monkeypatch, cumulative):
    module, poisoned = interpreted_module("moe_inductor.kernels.grouped_matmul", monkeypatch)
    sizes = [5, 0, 40, 1]
    dy = rand(50, 150, dtype=torch.bfloat16, seed=6)  # 150 columns: two column blocks, the second partial
    db = module.bias_grad(dy, _group_list(sizes, cumulative), cumulative, torch.float32)
    start = 0
    for g, n in enumerate(sizes):
        torch.testing.assert_close(db[g], dy[start : start + n].float().sum(0))
        start += n
    poisoned.check_guards()


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "group_list,group_type,clamped",
    [
        pytest.param([9, 3, 100], 0, [9, 9, 12], id="split_m_non_monotonic_and_past_M"),
        pytest.param([-5, 2, 7], 0, [0, 2, 7], id="split_m_negative"),
        pytest.param([4, 1, 999], 2, [4, 4, 20], id="split_k_past_K"),
    ],
)
def test_bad_group_list_never_writes_out_of_bounds(monkeypatch, loads, group_list, group_type, clamped):
    """group_list is validated on CPU only (checking it on a GPU is a sync): the kernel clamps instead."""
    module, poisoned = interpreted_module("moe_inductor.kernels.grouped_matmul", monkeypatch)
    tma = loads[0] == "tma"
    N = 8 if tma else 5  # TMA: 16-byte aligned weight rows; split K takes x as the transposed view that TMA reads
    x = rand(20, 12, seed=7).t() if tma and group_type == 2 else rand(12, 20, seed=7)
    w = rand(3, 20, N, seed=8) if group_type == 0 else rand(20, N, seed=8)
    assert (module._tma_layout(x, w, group_type) is not None) == tma
    y = module.gmm(x, w, None, torch.tensor(group_list), group_type, True)
    assert torch.isfinite(y).all()  # every element written
    poisoned.check_guards()
    # Each end is clamped into [previous end, size of the split axis]; a group that would shrink is empty.
    torch.testing.assert_close(y.double(), gmm_loop(x, w, None, clamped, group_type), rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_empty_inputs():
    w = rand(2, 6, 4)
    assert kernels.gmm(rand(0, 6), w, None, torch.tensor([0, 0]), 0, True).shape == (0, 4)
    y = kernels.gmm(rand(5, 6), rand(2, 6, 0), None, torch.tensor([2, 5]), 0, True)
    assert y.shape == (5, 0)
    y = kernels.gmm(rand(5, 0), rand(2, 0, 4), None, torch.tensor([2, 5]), 0, True)  # K = 0: zeros
    assert y.shape == (5, 4) and not y.any()


@pytest.mark.interpreter
@pytest.mark.parametrize("split_k", [False, True], ids=["split_m_tail_rows", "split_k_empty_groups"])
def test_zero_unwritten(split_k):
    """What the torch._grouped_mm path zeroes after it: exactly the tail rows / the empty groups, nothing else."""
    ends = torch.tensor([3, 3, 40, 40, 41])
    y = torch.full((5, 50, 300) if split_k else (50, 300), 7.0)
    kernels._zero_unwritten(y, ends, split_k)
    expected = torch.full_like(y, 7.0)
    if split_k:
        expected[[1, 3]] = 0
    else:
        expected[41:] = 0
    assert torch.equal(y, expected)


def test_autotuning_key_tells_small_groups_from_large_ones():
    """DeepSeek-V3 at 4k and at 16k tokens share N, K and the group count but not their best tiles: the autotuning
    key holds the rows per group in powers of two, read from the size hint (no guard) of a symbolic token count."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    symbol = env.create_symbol(32768, ConstantSource("M"), dynamic_dim=DimDynamic.DYNAMIC)
    traced = env.create_symintnode(symbol, hint=32768)
    assert kernels._rows_class(traced, 256) == 128 and not env.guards
    assert kernels._rows_class(131072, 256) == 512
    assert kernels._rows_class(32769, 256) == 256  # 128.004 rows: the next power of two
    assert [kernels._rows_class(m, 8) for m in (0, 8, 10**7)] == [64, 64, 4096]  # clamped at both ends
    assert kernels._rows_class(env.create_unbacked_symint(), 256) == 0  # no hint: one class of its own
    for split_m in (True, False):
        assert "ROWS_CLASS" in kernels._kernel(split_m, False, False).keys
