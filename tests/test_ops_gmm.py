"""gmm / gmm_v2 against a float64 per-group loop; the seed 004 calls; errors for bad group lists."""

from __future__ import annotations

import itertools

import pytest
import torch

from moe_inductor import ops
from oracles import GMM_TOL as TOL
from oracles import gmm_loop
from samples import rand

SIZES = [
    pytest.param([5, 0, 11, 1, 9], 37, id="empty_group_one_row_group_tail_rows"),
    pytest.param([0, 0, 0], 4, id="all_empty"),
    pytest.param([23], 23, id="one_group"),
    pytest.param([3, 4], 0 + 7, id="exact_total"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sizes,M", SIZES)
@pytest.mark.parametrize("transposed", [False, True])
def test_split_m_matches_loop(sizes, M, dtype, transposed):
    G, K, N = len(sizes), 19, 23
    x = rand(M, K, dtype=dtype, seed=1)
    w = rand(G, N, K, dtype=dtype, seed=2).transpose(1, 2) if transposed else rand(G, K, N, dtype=dtype, seed=2)
    bias = rand(G, N, dtype=dtype, seed=3)
    ends = list(itertools.accumulate(sizes))
    expected = gmm_loop(x, w, bias, ends, 0)
    out_cumsum = ops.gmm(x, w, bias=bias, group_list=ends)
    out_counts = ops.gmm_v2(x, w, bias=bias, group_list=torch.tensor(sizes))
    assert out_cumsum.dtype == dtype and out_cumsum.shape == (M, N)
    torch.testing.assert_close(out_cumsum.double(), expected, **TOL[dtype])
    assert torch.equal(out_cumsum, out_counts)
    assert not out_cumsum[ends[-1] :].any()  # rows past the last group stay zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_matches_loop(dtype):
    sizes = [4, 0, 7, 1]
    x, w = rand(13, 15, dtype=dtype, seed=4), rand(15, 6, dtype=dtype, seed=5)
    ends = list(itertools.accumulate(sizes))
    out = ops.gmm(x, w, group_list=torch.tensor(ends), group_type=2)
    assert out.shape == (4, 13, 6)
    torch.testing.assert_close(out.double(), gmm_loop(x, w, None, ends, 2), **TOL[dtype])
    assert not out[1].any()


def test_backward_is_dx_dw_dbias_of_each_group():
    sizes = [3, 0, 5, 2]
    x, w, bias = rand(12, 6, seed=6, grad=True), rand(4, 6, 7, seed=7, grad=True), rand(4, 7, seed=8, grad=True)
    dy = rand(12, 7, seed=9)
    out = ops.gmm_v2(x, w, bias=bias, group_list=torch.tensor(sizes))
    gx, gw, gb = torch.autograd.grad(out, (x, w, bias), dy)
    start = 0
    for g, n in enumerate(sizes):
        rows = slice(start, start + n)
        torch.testing.assert_close(gx[rows], dy[rows] @ w[g].T)
        torch.testing.assert_close(gw[g], x[rows].T @ dy[rows])
        torch.testing.assert_close(gb[g], dy[rows].sum(0))
        start += n
    assert not gx[start:].any()


def test_seed_004_examples():
    """MindSpeed's npu_gmm calls from seed 004 (fp16, 8 experts, seq 32, hidden 256)."""
    num_expert, seq_len, hidden_dim = 8, 32, 256
    gen = torch.Generator().manual_seed(0)
    x = ((torch.rand(seq_len, hidden_dim, generator=gen) - 0.5).half()).requires_grad_()
    weight = ((torch.rand(num_expert, hidden_dim, seq_len, generator=gen) - 0.5).half()).requires_grad_()
    group_list = [1, 3, 6, 10, 15, 21, 28, 32]
    result = ops.npu_gmm(x, weight, bias=None, group_list=group_list, group_type=0)
    torch.testing.assert_close(
        result.double(), gmm_loop(x.detach(), weight.detach(), None, group_list, 0), **TOL[torch.float16]
    )
    result.backward(torch.ones(result.shape, dtype=result.dtype))
    assert x.grad.shape == x.shape and weight.grad.shape == weight.shape

    weight_trans = ((torch.rand(num_expert, seq_len, hidden_dim, generator=gen) - 0.5).half()).requires_grad_()
    result = ops.npu_gmm(x, weight_trans.transpose(-1, -2), bias=None, group_list=group_list, group_type=0)
    torch.testing.assert_close(
        result.double(),
        gmm_loop(x.detach(), weight_trans.detach().transpose(-1, -2), None, group_list, 0),
        **TOL[torch.float16],
    )
    # The seed's npu_gmm_v2 example passes counts [1, 3, 3, 4, 5, 6, 7, 4], which sum to 33 > 32 rows:
    # invalid by the seed's own constraints, and rejected here with the reason.
    with pytest.raises(ValueError, match="'group_list' covers 33 rows but x has only 32"):
        ops.npu_gmm_v2(x, weight, bias=None, group_list=torch.tensor([1, 3, 3, 4, 5, 6, 7, 4]), group_type=0)


def test_errors():
    x, w = rand(10, 4), rand(3, 4, 5)
    with pytest.raises(
        ValueError, match="'group_list' \\(cumulative offsets\\) must be non-negative and non-decreasing"
    ):
        ops.gmm(x, w, group_list=[4, 2, 10])
    with pytest.raises(ValueError, match="'group_list' \\(per-group counts\\) must be non-negative"):
        ops.gmm_v2(x, w, group_list=torch.tensor([4, -1, 3]))
    with pytest.raises(ValueError, match="'group_list' covers 11 rows but x has only 10"):
        ops.gmm(x, w, group_list=[4, 6, 11])
    with pytest.raises(ValueError, match="len\\(group_list\\) = 2 but 'weight' has G = 3"):
        ops.gmm(x, w, group_list=[4, 10])
    with pytest.raises(ValueError, match="'group_type' must be 0 \\(split M\\) or 2"):
        ops.gmm(x, w, group_list=[4, 6, 10], group_type=1)
    with pytest.raises(ValueError, match="'bias' is only supported with group_type=0"):
        ops.gmm(x, rand(4, 5), bias=rand(3, 5), group_list=[1, 2, 4], group_type=2)
    with pytest.raises(ValueError, match="'group_list' covers 5 columns but x has only 4"):
        ops.gmm(x, rand(4, 5), group_list=[1, 2, 5], group_type=2)
    with pytest.raises(TypeError, match="'weight' must have dtype"):
        ops.gmm(x, w.double(), group_list=[4, 6, 10])
    with pytest.raises(ValueError, match="'weight' must be \\[G, K, N\\] with K = x.shape\\[1\\] = 4"):
        ops.gmm(x, rand(3, 5, 5), group_list=[4, 6, 10])
    with pytest.raises(ValueError, match="'bias' must have shape \\(3, 5\\) \\(\\[G, N\\]\\)"):
        ops.gmm(x, w, bias=rand(3, 4), group_list=[4, 6, 10])
    with pytest.raises(ValueError, match="'group_list' is required"):
        ops.gmm(x, w)
    with pytest.raises(NotImplementedError, match="gemm_fusion"):
        ops.gmm(x, w, group_list=[4, 6, 10], gemm_fusion=True)
