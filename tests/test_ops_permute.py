"""Permute / unpermute: equal to Megatron's eager code and to torch_npu's formulas, bit for bit where they are exact."""

from __future__ import annotations

import pytest
import torch

from moe_inductor import ops
from oracles import (
    megatron_permute_argsort,
    megatron_permute_masked_select,
    megatron_unpermute,
    npu_permute_formula,
)
from samples import rand, routing_map

# (T, E, K, routing keywords): non-powers of two, one expert, skew, unrouted (-1) slots.
ROUTINGS = [
    pytest.param(13, 6, 3, {}, id="T13_E6_K3"),
    pytest.param(37, 11, 5, dict(skew=True, seed=1), id="T37_E11_K5_skewed"),
    pytest.param(29, 7, 2, dict(unrouted=0.35, seed=2), id="T29_E7_K2_unrouted"),
    pytest.param(8, 1, 1, {}, id="T8_E1_K1"),
    pytest.param(0, 5, 2, {}, id="T0"),
]


def _bitwise(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Megatron-style permute / unpermute == Megatron's eager code
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,E,K,kw", ROUTINGS)
def test_megatron_dropless_equals_masked_select_code(T, E, K, kw):
    rmap, pmap = routing_map(T, E, K, **kw)
    tokens = rand(T, 17, seed=3)
    expected = megatron_permute_masked_select(tokens, rmap, pmap)
    actual = ops.permute(tokens, rmap, pmap)
    for a, e in zip(actual, expected, strict=True):
        _bitwise(a, e)

    permuted = rand(*expected[0].shape, seed=4)
    for probs in (pmap, None):
        _bitwise(
            ops.unpermute(permuted, actual[2], tokens.shape, probs=probs, routing_map=rmap),
            megatron_unpermute(permuted, expected[2], tokens.shape, probs, rmap),
        )


@pytest.mark.parametrize("T,E,K,kw", ROUTINGS)
@pytest.mark.parametrize("rows", ["count", "fewer", "more"])
def test_megatron_static_num_out_tokens_equals_argsort_code(T, E, K, kw, rows):
    """Static `num_out_tokens` is Megatron's fixed-shape argsort form: truncates, or pads with non-routed pairs."""
    rmap, pmap = routing_map(T, E, K, **kw)
    count = int(rmap.sum())
    n = {"count": count, "fewer": count // 2, "more": min(count + 5, T * E)}[rows]
    tokens = rand(T, 9, seed=5)
    expected = megatron_permute_argsort(tokens, rmap, pmap, num_out_tokens=n)
    actual = ops.permute(tokens, rmap, pmap, num_out_tokens=n)
    assert actual[0].shape[0] == n
    for a, e in zip(actual, expected, strict=True):
        _bitwise(a, e)


@pytest.mark.parametrize(
    "T,E,K,capacity,kw",
    [
        pytest.param(13, 5, 2, 4, dict(seed=4), id="underfull"),
        pytest.param(13, 6, 3, 2, dict(skew=True, seed=5), id="overfull_skewed"),
        pytest.param(9, 4, 2, 3, dict(unrouted=0.4, seed=6), id="unrouted"),
        pytest.param(6, 1, 1, 6, {}, id="one_expert_capacity_T"),
    ],
)
def test_megatron_drop_and_pad_equals_argsort_code(T, E, K, capacity, kw):
    rmap, pmap = routing_map(T, E, K, **kw)
    tokens = rand(T, 7, seed=6)
    n = capacity * E
    expected = megatron_permute_masked_select(tokens, rmap, pmap, num_out_tokens=n, drop_and_pad=True)
    actual = ops.permute(tokens, rmap, pmap, num_out_tokens=n, drop_and_pad=True)
    for a, e in zip(actual, expected, strict=True):
        _bitwise(a, e)
    counts = rmap.sum(0)
    if E > 1:
        assert (counts < capacity).any() or (counts > capacity).any()  # the case really is under- or over-full

    permuted = rand(n, 7, seed=7)
    for probs in (pmap, None):
        _bitwise(
            ops.unpermute(permuted, actual[2], tokens.shape, probs=probs, routing_map=rmap, drop_and_pad=True),
            megatron_unpermute(permuted, expected[2], tokens.shape, probs, rmap, drop_and_pad=True),
        )


def test_megatron_capacity_above_T_keeps_every_token_once():
    """Megatron's argsort(...)[:, :C] stops at T per expert; its probs path would fail there, ours does not."""
    rmap, pmap = routing_map(4, 3, 2, seed=10)
    tokens = rand(4, 5)
    expected = megatron_permute_masked_select(tokens, rmap, None, num_out_tokens=30, drop_and_pad=True)
    actual = ops.permute(tokens, rmap, pmap, num_out_tokens=30, drop_and_pad=True)
    _bitwise(actual[0], expected[0])
    _bitwise(actual[2], expected[2])
    assert actual[1].shape == (12,)


def test_megatron_drop_and_pad_without_num_out_tokens_is_dropless():
    rmap, pmap = routing_map(9, 5, 2, seed=3)
    tokens = rand(9, 4)
    for a, e in zip(
        ops.permute(tokens, rmap, pmap, drop_and_pad=True),
        megatron_permute_masked_select(tokens, rmap, pmap),
        strict=True,
    ):
        _bitwise(a, e)


def test_megatron_gradients_equal_autograd_through_eager_code():
    rmap, pmap = routing_map(23, 7, 3, skew=True, seed=11)
    tokens = rand(23, 6, seed=12)

    def grads(permute_fn, unpermute_fn):
        x, p = tokens.clone().requires_grad_(), pmap.clone().requires_grad_()
        permuted, permuted_probs, idx = permute_fn(x, rmap, p)
        y = permuted * 1.5 + permuted_probs.unsqueeze(-1)
        out = unpermute_fn(y, idx, x.shape, p, rmap)
        out.backward(rand(*out.shape, seed=13))
        return out, x.grad, p.grad

    expected = grads(megatron_permute_masked_select, megatron_unpermute)
    actual = grads(lambda x, r, p: ops.permute(x, r, p), lambda y, i, s, p, r: ops.unpermute(y, i, s, p, r))
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_bf16_unpermute_accumulates_in_fp32():
    """One rounding at the end: the float64 sum rounded to bf16, unlike adding row by row in bf16 (what
    Megatron's scatter_add does with atomics on a GPU)."""
    rmap, _ = routing_map(64, 8, 6, seed=14)
    idx = megatron_permute_masked_select(rand(64, 1), rmap)[2]
    permuted = rand(idx.shape[0], 256, dtype=torch.bfloat16, seed=15)
    exact = megatron_unpermute(permuted.double(), idx, (64, 256))
    ours = ops.unpermute(permuted, idx, (64, 256))
    row_by_row = torch.zeros(64, 256, dtype=torch.bfloat16)
    for r, t in enumerate(idx.tolist()):
        row_by_row[t] = row_by_row[t] + permuted[r]  # rounds to bf16 after every add
    assert ours.dtype == torch.bfloat16
    # Six bf16 rows add exactly in fp32, so a single rounding gives the correctly rounded sum.
    torch.testing.assert_close(ours, exact.to(torch.bfloat16), rtol=0, atol=0)
    assert (ours.double() - exact).abs().sum() < (row_by_row.double() - exact).abs().sum()


# ---------------------------------------------------------------------------------------------------------------------
# torch_npu style == the aclnnMoeTokenPermuteWithRoutingMap formulas (seed 001)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,E,K,kw", [p for p in ROUTINGS if "unrouted" not in p.id])
def test_npu_dropless_equals_seed_formula(T, E, K, kw):
    rmap, pmap = routing_map(T, E, K, **kw)
    tokens = rand(T, 11, seed=16)
    expected = npu_permute_formula(tokens, rmap, pmap, num_out_tokens=T * K)
    actual = ops.moe_token_permute_with_routing_map(tokens, rmap, probs=pmap, num_out_tokens=T * K)
    for a, e in zip(actual, expected, strict=True):
        _bitwise(a, e)
    # The inverse map is the stable argsort of Megatron's forward map.
    forward = ops.permute(tokens, rmap, num_out_tokens=T * K)[2]
    _bitwise(actual[2].long(), torch.argsort(forward, stable=True))


@pytest.mark.parametrize(
    "T,E,K,capacity,kw",
    [
        pytest.param(13, 5, 2, 4, dict(seed=4), id="underfull"),
        pytest.param(13, 6, 3, 2, dict(skew=True, seed=5), id="overfull_skewed"),
    ],
)
def test_npu_drop_and_pad_equals_seed_formula(T, E, K, capacity, kw):
    rmap, pmap = routing_map(T, E, K, **kw)
    tokens = rand(T, 5, seed=17)
    expected = npu_permute_formula(tokens, rmap, pmap, num_out_tokens=capacity * E, drop_and_pad=True)
    actual = ops.moe_token_permute_with_routing_map(
        tokens, rmap.to(torch.int8), probs=pmap, num_out_tokens=capacity * E + 1, drop_and_pad=True
    )
    for a, e in zip(actual, expected, strict=True):
        _bitwise(a, e)


def test_npu_num_out_tokens_none_means_one_expert_per_token():
    rmap, pmap = routing_map(10, 4, 1, seed=18)
    tokens = rand(10, 3)
    actual = ops.moe_token_permute_with_routing_map(tokens, rmap, probs=pmap)
    expected = npu_permute_formula(tokens, rmap, pmap)
    for a, e in zip(actual, expected, strict=True):
        _bitwise(a, e)


def _npu_unpermute_loop(permuted, sorted_indices, T, probs, rmap):
    K = sorted_indices.numel() // T if T else 0
    out = torch.zeros(T, permuted.shape[1], dtype=torch.float64)
    for t in range(T):
        experts = rmap[t].nonzero().flatten().tolist()
        for j in range(K):
            row = int(sorted_indices[t * K + j])
            w = 1.0 if probs is None else float(probs[t, experts[j]])
            out[t] += permuted[row].double() * w
    return out


@pytest.mark.parametrize("T,E,K,kw", [p for p in ROUTINGS if "unrouted" not in p.id])
def test_npu_unpermute_equals_loop(T, E, K, kw):
    rmap, pmap = routing_map(T, E, K, **kw)
    _, _, sorted_indices = ops.moe_token_permute_with_routing_map(rand(T, 3), rmap, num_out_tokens=T * K)
    permuted = rand(T * K, 8, seed=19)
    for probs in (pmap, None):
        actual = ops.moe_token_unpermute_with_routing_map(
            permuted, sorted_indices, (T, 8), probs=probs, routing_map=rmap
        )
        torch.testing.assert_close(actual, _npu_unpermute_loop(permuted, sorted_indices, T, probs, rmap).float())


def test_npu_unpermute_drop_and_pad_matches_megatron():
    rmap, pmap = routing_map(13, 5, 2, seed=4)
    tokens = rand(13, 6)
    _, _, sorted_indices = ops.moe_token_permute_with_routing_map(tokens, rmap, num_out_tokens=20, drop_and_pad=True)
    permuted = rand(20, 6, seed=20)
    actual = ops.moe_token_unpermute_with_routing_map(
        permuted, sorted_indices, (13, 6), probs=pmap, routing_map=rmap, drop_and_pad=True
    )
    _bitwise(actual, megatron_unpermute(permuted, sorted_indices.long(), (13, 6), pmap, rmap, drop_and_pad=True))


def test_round_trip_restores_tokens():
    rmap, pmap = routing_map(31, 9, 4, seed=21)
    tokens = rand(31, 12, seed=22)
    permuted, permuted_probs, idx = ops.moe_token_permute_with_routing_map(
        tokens, rmap, probs=pmap, num_out_tokens=31 * 4
    )
    # Weighting by the probs and combining is the same as weighting each token by the sum of its probs.
    out = ops.moe_token_unpermute_with_routing_map(permuted, idx, tokens.shape, probs=pmap, routing_map=rmap)
    torch.testing.assert_close(out, tokens * pmap.sum(1, keepdim=True))
    torch.testing.assert_close(permuted_probs.sum(), pmap.sum())


def test_unpermute_skips_minus_one_rows():
    idx = torch.tensor([2, -1, 0, 2])
    permuted = rand(4, 3, seed=23)
    out = ops.unpermute(permuted, idx, (3, 3))
    expected = torch.stack([permuted[2], torch.zeros(3), permuted[0] + permuted[3]])
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Errors name the argument
# ---------------------------------------------------------------------------------------------------------------------


def test_errors():
    rmap, pmap = routing_map(6, 4, 2)
    tokens = rand(6, 3)
    with pytest.raises(ValueError, match="'num_out_tokens' .* multiple of the number of tokens"):
        ops.moe_token_permute_with_routing_map(tokens, rmap, num_out_tokens=13)
    with pytest.raises(ValueError, match="'num_out_tokens' .*experts per token"):
        ops.moe_token_permute_with_routing_map(tokens, rmap, num_out_tokens=30)
    with pytest.raises(ValueError, match="'routing_map' row 0 routes to 2 experts"):
        ops.moe_token_permute_with_routing_map(tokens, rmap, num_out_tokens=6 * 3)
    with pytest.raises(ValueError, match="capacity .* must be > 0"):
        ops.moe_token_permute_with_routing_map(tokens, rmap, num_out_tokens=3, drop_and_pad=True)
    with pytest.raises(ValueError, match="capacity .* exceeds the number of tokens"):
        ops.moe_token_permute_with_routing_map(tokens, rmap, num_out_tokens=40, drop_and_pad=True)
    with pytest.raises(ValueError, match="capacity .* must be > 0"):
        ops.permute(tokens, rmap, num_out_tokens=3, drop_and_pad=True)
    with pytest.raises(TypeError, match="'routing_map' must have dtype"):
        ops.permute(tokens, rmap.float())
    with pytest.raises(ValueError, match="'routing_map' must hold only 0/1"):
        ops.permute(tokens, rmap.to(torch.int8) * 2)
    with pytest.raises(ValueError, match="'probs' must have shape"):
        ops.permute(tokens, rmap, pmap[:, :3])
    with pytest.raises(ValueError, match="'tokens' has 5 rows"):
        ops.permute(tokens[:5], rmap)
    with pytest.raises(ValueError, match="'num_out_tokens' .* exceeds"):
        ops.permute(tokens, rmap, num_out_tokens=25)
    with pytest.raises(ValueError, match="'num_out_tokens' must be >= 0"):
        ops.permute(tokens, rmap, num_out_tokens=-1)

    permuted, _, idx = ops.permute(tokens, rmap, num_out_tokens=12)
    with pytest.raises(ValueError, match="'routing_map' must be provided"):
        ops.unpermute(permuted, idx, tokens.shape, probs=pmap)
    with pytest.raises(ValueError, match="'sorted_indices' must hold token ids"):
        ops.unpermute(permuted, idx + 6, tokens.shape)
    with pytest.raises(ValueError, match="'permuted_tokens' has hidden size 3 but 'restore_shape' says 4"):
        ops.unpermute(permuted, idx, (6, 4))
    with pytest.raises(ValueError, match="'sorted_indices' has 11 entries"):
        ops.unpermute(permuted, idx[:11], tokens.shape)
    with pytest.raises(ValueError, match="'routing_map' is required with 'probs'"):
        ops.moe_token_unpermute_with_routing_map(permuted, idx.int(), tokens.shape, probs=pmap)
    with pytest.raises(ValueError, match="'sorted_indices' must hold row ids"):
        ops.moe_token_unpermute_with_routing_map(permuted, idx.int() + 12, tokens.shape)
    with pytest.raises(ValueError, match="not a multiple of E=4"):
        ops.moe_token_unpermute_with_routing_map(
            permuted[:11], idx[:11].int(), tokens.shape, probs=pmap, drop_and_pad=True
        )


# ---------------------------------------------------------------------------------------------------------------------
# Property: any routing, any mode, Megatron's code and ours agree exactly
# ---------------------------------------------------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def megatron_calls(draw):
    num_experts = draw(st.integers(1, 12))
    num_tokens = draw(st.integers(0, 40))
    topk = draw(st.integers(1, num_experts))
    seed = draw(st.integers(0, 2**16))
    unrouted = draw(st.sampled_from([0.0, 0.3]))
    rmap, pmap = routing_map(num_tokens, num_experts, topk, seed=seed, unrouted=unrouted, skew=draw(st.booleans()))
    mode = draw(st.sampled_from(["masked_select", "argsort", "pad"]))
    count = int(rmap.sum())
    if mode == "masked_select":
        n = None
    elif mode == "argsort":
        n = draw(st.integers(0, num_tokens * num_experts))
    else:
        n = num_experts * draw(st.integers(1, max(num_tokens, 1)))
        if num_tokens == 0:
            n = 0
    return rand(num_tokens, 5, seed=seed), rmap, pmap, n, mode == "pad", count


@settings(max_examples=60, deadline=None)
@given(megatron_calls())
def test_property_megatron_permute_unpermute(call):
    tokens, rmap, pmap, n, pad, count = call
    oracle = megatron_permute_argsort if (n is not None and not pad) else megatron_permute_masked_select
    expected = oracle(tokens, rmap, pmap, num_out_tokens=n, drop_and_pad=pad)
    actual = ops.permute(tokens, rmap, pmap, num_out_tokens=n, drop_and_pad=pad)
    for a, e in zip(actual, expected, strict=True):
        _bitwise(a, e)
    if n is None or pad or n == count:  # the pairs Megatron's unpermute can weight
        permuted = rand(*actual[0].shape, seed=1)
        _bitwise(
            ops.unpermute(permuted, actual[2], tokens.shape, probs=pmap, routing_map=rmap, drop_and_pad=pad),
            megatron_unpermute(permuted, expected[2], tokens.shape, pmap, rmap, drop_and_pad=pad),
        )
