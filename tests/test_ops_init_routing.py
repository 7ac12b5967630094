"""moe_init_routing_v2 and moe_finalize_routing against loops written from SPEC §4 / §4b."""

from __future__ import annotations

import pytest
import torch

from moe_inductor import ops
from oracles import finalize_loop, init_routing_loop
from samples import init_routing_cases, rand, topk_routing

CASES = init_routing_cases()


@pytest.mark.parametrize("name,x,idx,kw", CASES, ids=[c[0] for c in CASES])
def test_init_routing_matches_loop(name, x, idx, kw):
    actual = ops.moe_init_routing_v2(x, idx, **kw)
    expected = init_routing_loop(x.detach(), idx, **kw)
    for a, e, what in zip(
        actual, expected, ("expanded_x", "expanded_row_idx", "counts", "expanded_scale"), strict=True
    ):
        assert a.dtype == e.dtype and a.shape == e.shape, what
        assert torch.equal(a.detach(), e), what


def test_seed_002_example_call():
    """The call printed in seed 002 (one token, K=475 > experts in range, active range [23, 35))."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 613, generator=gen)
    expert_idx = torch.randint(0, 226, (1, 475), generator=gen, dtype=torch.int32)
    scale = torch.randn(1, generator=gen)
    kw = dict(
        scale=scale,
        offset=None,
        active_num=475,
        expert_capacity=-1,
        expert_num=226,
        drop_pad_mode=0,
        expert_tokens_num_type=1,
        expert_tokens_num_flag=True,
        quant_mode=-1,
        active_expert_range=[23, 35],
        row_idx_type=0,
    )
    expanded_x, row_idx, counts, expanded_scale = ops.npu_moe_init_routing_v2(x, expert_idx, **kw)
    expected = init_routing_loop(x, expert_idx, **kw)
    avail = int(((expert_idx >= 23) & (expert_idx < 35)).sum())
    assert expanded_x.shape == (475, 613) and counts.shape == (12,) and int(counts.sum()) == avail
    assert torch.equal(expanded_x[:avail], x.expand(avail, -1)) and not expanded_x[avail:].any()
    for a, e in zip((expanded_x, row_idx, counts, expanded_scale), expected, strict=True):
        assert torch.equal(a, e)


def test_dynamic_quant_round_trips_within_half_a_step():
    x = rand(33, 70, seed=3) * 5
    idx, _ = topk_routing(33, 9, 3, seed=4, id_dtype=torch.int32)
    q, row_idx, _, ds = ops.moe_init_routing_v2(x, idx, expert_num=9, quant_mode=1)
    assert q.dtype == torch.int8 and ds.dtype == torch.float32
    tokens = row_idx.long().view(33, 3)
    dequant = q.float() * ds.unsqueeze(-1)
    for k in range(3):
        err = (dequant[tokens[:, k]] - x).abs()
        assert (err <= ds[tokens[:, k]].unsqueeze(-1) / 2 + 1e-6).all()
    assert q.abs().max() == 127


def test_gradient_of_x_sums_the_copies():
    x = rand(11, 6, seed=5, grad=True)
    idx, _ = topk_routing(11, 7, 3, seed=6, id_dtype=torch.int32)
    expanded_x, row_idx, _, _ = ops.moe_init_routing_v2(x, idx, expert_num=7, active_expert_range=[2, 6], active_num=20)
    grad_rows = rand(*expanded_x.shape, seed=7)
    (grad,) = torch.autograd.grad(expanded_x, x, grad_rows)
    expected = torch.zeros(11, 6)
    for j, r in enumerate(row_idx.tolist()):
        if r >= 0:
            expected[j // 3] += grad_rows[r]
    torch.testing.assert_close(grad, expected)


def test_init_then_finalize_is_the_weighted_sum():
    x = rand(21, 16, seed=8)
    idx, probs = topk_routing(21, 7, 3, seed=9, id_dtype=torch.int32)
    expanded_x, row_idx, _, _ = ops.moe_init_routing_v2(x, idx, expert_num=7)
    out = ops.npu_moe_finalize_routing(expanded_x * 2, None, None, None, probs, row_idx, idx, 2)
    torch.testing.assert_close(out, 2 * x * probs.sum(1, keepdim=True))


FINALIZE_CASES = [
    pytest.param(0, torch.float32, id="mode0_column_major"),
    pytest.param(1, torch.float32, id="mode1_drop_column_major"),
    pytest.param(2, torch.bfloat16, id="mode2_row_major_bf16"),
    pytest.param(3, torch.float32, id="mode3_drop_row_major"),
]


@pytest.mark.parametrize("mode,dtype", FINALIZE_CASES)
def test_finalize_matches_loop(mode, dtype):
    T, E, K, H, C = 17, 6, 3, 9, 4
    idx, probs = topk_routing(T, E, K, seed=mode, id_dtype=torch.int32, skew=True)
    drop = mode in (1, 3)
    _, row_idx, _, _ = ops.moe_init_routing_v2(
        rand(T, H), idx, expert_num=E, drop_pad_mode=1 if drop else 0, expert_capacity=C if drop else -1
    )
    assert (row_idx < 0).any() == drop  # drop mode really drops copies
    if mode in (0, 1):
        row_idx = row_idx.view(T, K).t().reshape(-1).contiguous()
    expanded = rand(*((E, C, H) if drop else (T * K, H)), dtype=dtype, seed=10)
    skip1, skip2, bias = (
        rand(T, H, dtype=dtype, seed=11),
        rand(T, H, dtype=dtype, seed=12),
        rand(E, H, dtype=dtype, seed=13),
    )
    scales = probs.to(dtype)
    out = ops.moe_finalize_routing(expanded, skip1, skip2, bias, scales, row_idx, idx, mode)
    expected = finalize_loop(expanded, skip1, skip2, bias, scales, row_idx, idx, mode, K)
    assert out.dtype == dtype
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.double(), expected, **tol)


def test_finalize_optional_inputs():
    rows = rand(6, 4, seed=14)
    row_idx = torch.tensor([5, 0, -1, 2, 3, 1], dtype=torch.int32)
    out = ops.moe_finalize_routing(rows, None, None, None, None, row_idx, None, 2, k=2)
    expected = torch.stack([rows[5] + rows[0], rows[2], rows[3] + rows[1]])
    torch.testing.assert_close(out, expected)
    out2 = ops.moe_finalize_routing(
        rows, None, None, None, torch.ones(3, 2), row_idx, None, 2, expert_for_source_row=None
    )
    torch.testing.assert_close(out2, expected)


def test_errors():
    x = rand(5, 4)
    idx, probs = topk_routing(5, 6, 2, id_dtype=torch.int32)
    call = ops.moe_init_routing_v2
    with pytest.raises(ValueError, match="unknown 'quant_mode' 2"):
        call(x, idx, expert_num=6, quant_mode=2)
    with pytest.raises(ValueError, match="'expert_capacity' must be > 0"):
        call(x, idx, expert_num=6, drop_pad_mode=1, expert_capacity=0)
    with pytest.raises(ValueError, match="drop/pad mode needs the full expert range"):
        call(x, idx, expert_num=6, drop_pad_mode=1, expert_capacity=2, active_expert_range=[1, 6])
    with pytest.raises(ValueError, match="drop/pad mode only defines row_idx_type=0"):
        call(x, idx, expert_num=6, drop_pad_mode=1, expert_capacity=2, row_idx_type=1)
    with pytest.raises(ValueError, match="'expert_num' must be > 0"):
        call(x, idx)
    with pytest.raises(ValueError, match="'active_expert_range' \\[4, 2\\)"):
        call(x, idx, expert_num=6, active_expert_range=[4, 2])
    with pytest.raises(ValueError, match="'active_expert_range' \\[0, 9\\)"):
        call(x, idx, expert_num=6, active_expert_range=[0, 9])
    with pytest.raises(ValueError, match="smooth 'scale' must be"):
        call(x, idx, expert_num=6, quant_mode=1, scale=torch.ones(3, 4))
    with pytest.raises(ValueError, match="'x' is already int8"):
        call(x.to(torch.int8), idx, expert_num=6, quant_mode=1)
    with pytest.raises(ValueError, match="quant_mode=0 \\(static\\) needs 'offset'"):
        call(x, idx, expert_num=6, quant_mode=0, scale=torch.ones(1))
    with pytest.raises(ValueError, match="'scale' must have shape"):
        call(x, idx, expert_num=6, scale=torch.ones(4))
    with pytest.raises(TypeError, match="'expert_idx' must have dtype"):
        call(x, idx.float(), expert_num=6)
    with pytest.raises(ValueError, match="'expert_idx' has 4 rows"):
        call(x, idx[:4], expert_num=6)

    fin = ops.moe_finalize_routing
    rows = rand(10, 4)
    row_idx = torch.arange(10, dtype=torch.int32)
    with pytest.raises(ValueError, match="pass 'k'"):
        fin(rows, None, None, None, None, row_idx, None, 2)
    with pytest.raises(ValueError, match="'bias' needs 'expert_for_source_row'"):
        fin(rows, None, None, torch.ones(6, 4), probs, row_idx, None, 2)
    with pytest.raises(ValueError, match="'expanded_src_to_dst_row' must hold rows in \\[0, 10\\)"):
        fin(rows, None, None, None, probs, row_idx + 1, None, 2)
    with pytest.raises(ValueError, match="'expert_for_source_row' must hold experts in \\[0, 3\\)"):
        fin(rows, None, None, torch.ones(3, 4), probs, row_idx, idx, 2)
    with pytest.raises(ValueError, match="'skip1' must have shape"):
        fin(rows, torch.ones(4, 4), None, None, probs, row_idx, None, 2)
    with pytest.raises(ValueError, match="'expert_for_source_row' has 2 columns but top-k is 3"):
        fin(rows, None, None, None, torch.ones(5, 3), row_idx, idx, 2)
    with pytest.raises(ValueError, match="'expanded_permuted_rows' must be 3-D"):
        fin(rows, None, None, None, probs, row_idx, None, 1)
    with pytest.raises(ValueError, match="'drop_pad_mode' must be 0, 1, 2 or 3"):
        fin(rows, None, None, None, probs, row_idx, None, 4)
