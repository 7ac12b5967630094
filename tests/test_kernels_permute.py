"""Triton permute / unpermute kernels against the plain-torch reference, forward and backward.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET), called directly on the
samples every op is checked with (T=0, E and K not powers of two, -1 ids, skewed routing, truncation and fillers,
drop-and-pad under- and over-full). On a GPU the same comparison runs on CUDA tensors at the benchmark shapes.
Permute outputs are copies and must be bitwise equal; combines sum in float32 in the reference's order (one bf16
ulp allowed: the interpreter truncates float32 -> bf16 stores, GPUs round to nearest).
"""

from __future__ import annotations

import pytest
import torch

from moe_inductor.reference import permutation as ref
from samples import BUILDERS, topk_routing

kernels = pytest.importorskip("moe_inductor.kernels.permutation")

PERMUTES = ("moe_token_permute_with_routing_map", "permute")
UNPERMUTES = {
    "moe_token_unpermute_with_routing_map": "moe_token_unpermute_backward",
    "unpermute": "unpermute_backward",
}


def _detached(args, device="cpu"):
    return tuple(a.detach().to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _cases(ops):
    return [pytest.param(op, s, id=f"{op}-{s.name}") for op in ops for s in BUILDERS[op]()]


def _assert_same(actual, expected, exact=True):
    if expected is None:
        assert actual is None
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if exact:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    elif expected.dtype in (torch.bfloat16, torch.float16):
        # One rounding of a float32 sum; Triton's interpreter truncates float32 -> bf16 where GPUs round to nearest.
        torch.testing.assert_close(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _grads_like(outputs, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        None if o is None or not o.is_floating_point() else torch.randn(o.shape, generator=g).to(o.dtype)
        for o in outputs
    ]


@pytest.mark.interpreter
@pytest.mark.parametrize("op, sample", _cases(PERMUTES))
def test_permute_matches_reference(op, sample):
    args = _detached(sample.args)
    expected = getattr(ref, op)(*args)
    actual = getattr(kernels, op)(*args)
    for a, e in zip(actual, expected, strict=True):
        _assert_same(a, e)

    tokens, routing_map, probs, _, _ = args
    grad_permuted, grad_probs = _grads_like(expected[:2], seed=3)
    num_rows = expected[2].shape[0] if op == "permute" else expected[0].shape[0]
    pad = args[4] and (op != "permute" or args[3] is not None)
    want = ref.permute_backward(grad_permuted, grad_probs, routing_map, num_rows, pad)
    got = kernels.permute_backward(grad_permuted, grad_probs, routing_map, num_rows, pad)
    for a, e in zip(got, want, strict=True):
        _assert_same(a, e, exact=False)


@pytest.mark.interpreter
@pytest.mark.parametrize("op, sample", _cases(UNPERMUTES))
def test_unpermute_matches_reference(op, sample):
    args = _detached(sample.args)
    _assert_same(getattr(kernels, op)(*args), getattr(ref, op)(*args), exact=False)

    permuted, sorted_indices, restore_shape, probs, routing_map, pad = args
    (grad_out,) = _grads_like([permuted.new_empty(restore_shape)], seed=5)
    for need_probs in (False, True) if probs is not None else (False,):
        backward = UNPERMUTES[op]
        want = getattr(ref, backward)(grad_out, permuted, sorted_indices, probs, routing_map, pad, need_probs)
        got = getattr(kernels, backward)(grad_out, permuted, sorted_indices, probs, routing_map, pad, need_probs)
        for a, e in zip(got, want, strict=True):
            _assert_same(a, e, exact=False)


@pytest.mark.interpreter
def test_row_map_never_writes_past_num_out_tokens():
    """Truncating permute: every pair past the first N gets no row, and outputs are exactly N rows."""
    T, E, K, H = 29, 7, 3, 5
    idx, probs = topk_routing(T, E, K, seed=4, skew=True)
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter(1, idx, True)
    probs_map = torch.zeros(T, E).scatter(1, idx, probs)
    tokens = torch.randn(T, H)
    for n in (0, 1, 17, T * K - 1, T * K, T * E):
        got = kernels.permute(tokens, routing_map, probs_map, n, False)
        want = ref.permute(tokens, routing_map, probs_map, n, False)
        for a, e in zip(got, want, strict=True):
            _assert_same(a, e)
        rows = kernels.pair_rows(routing_map, n).row_of_pair
        assert int(rows.max()) < n if n else bool((rows == -1).all())
        assert int((rows >= 0).sum()) == min(n, T * E)


SHAPES = [(16384, 256, 8, 7168), (4096, 128, 8, 2048), (4099, 61, 6, 1000), (16384, 8, 2, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pad", [False, True])
def test_gpu_permute_unpermute_full_shapes(shape, pad):
    T, E, K, H = shape
    idx, probs = topk_routing(T, E, K, seed=T + E, skew=E > 8)
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter(1, idx, True)
    probs_map = torch.zeros(T, E).scatter(1, idx, probs)
    tokens = torch.randn(T, H, dtype=torch.bfloat16)
    n = (T * K // E) * E if pad else T * K
    cpu = ref.permute(tokens, routing_map, probs_map, n, pad)
    cuda = kernels.permute(tokens.cuda(), routing_map.cuda(), probs_map.cuda(), n, pad)
    for a, e in zip(cuda, cpu, strict=True):
        _assert_same(a.cpu(), e)
    permuted, _, sorted_indices = cpu
    y = torch.randn(permuted.shape, dtype=torch.bfloat16)
    want = ref.unpermute(y, sorted_indices, [T, H], probs_map, routing_map, pad)
    got = kernels.unpermute(y.cuda(), sorted_indices.cuda(), [T, H], probs_map.cuda(), routing_map.cuda(), pad)
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.interpreter
@pytest.mark.parametrize("H", [7, 2100])  # one block of H, and three (the backward splits H into 1024-column blocks)
def test_tokens_with_more_rows_than_the_compact_list(H):
    """Uneven routing: most tokens take one expert, a few take all of them (past the list width of the average)."""
    T, E = 23, 11
    g = torch.Generator().manual_seed(9)
    routing_map = torch.zeros(T, E, dtype=torch.bool)
    routing_map[torch.arange(T), torch.randint(0, E, (T,), generator=g)] = True
    routing_map[[2, 5, 17]] = True
    probs = torch.rand(T, E, generator=g) * routing_map
    tokens = torch.randn(T, H, generator=g)
    rows = kernels.pair_rows(routing_map, int(routing_map.sum()))
    assert rows.list_width < E and int(rows.row_count.max()) == E

    got, want = (
        kernels.permute(tokens, routing_map, probs, None, False),
        ref.permute(tokens, routing_map, probs, None, False),
    )
    for a, e in zip(got, want, strict=True):
        _assert_same(a, e)
    permuted, _, sorted_indices = want
    y = torch.randn(permuted.shape, generator=g)
    _assert_same(
        kernels.unpermute(y, sorted_indices, [T, H], probs, routing_map, False),
        ref.unpermute(y, sorted_indices, [T, H], probs, routing_map, False),
        exact=False,
    )
    grad_out = torch.randn(T, H, generator=g)
    got = kernels.unpermute_backward(grad_out, y, sorted_indices, probs, routing_map, False, True)
    want = ref.unpermute_backward(grad_out, y, sorted_indices, probs, routing_map, False, True)
    for a, e in zip(got, want, strict=True):
        _assert_same(a, e, exact=False)
    grad_probs = torch.randn(y.shape[0], generator=g)
    got = kernels.permute_backward(y, grad_probs, routing_map, y.shape[0], False)
    want = ref.permute_backward(y, grad_probs, routing_map, y.shape[0], False)
    for a, e in zip(got, want, strict=True):
        _assert_same(a, e, exact=False)


@pytest.mark.interpreter
@pytest.mark.parametrize("E", [300, 520])
def test_more_experts_than_one_count_tile(E):
    """The per-chunk expert counts take 256 experts per program: 300 and 520 experts span two and three programs."""
    T, K, H = 37, 5, 16
    idx, probs = topk_routing(T, E, K, seed=E, skew=True)
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter(1, idx, True)
    probs_map = torch.zeros(T, E).scatter(1, idx, probs)
    tokens = torch.randn(T, H)
    got, want = (
        kernels.permute(tokens, routing_map, probs_map, T * K, False),
        ref.permute(tokens, routing_map, probs_map, T * K, False),
    )
    for a, e in zip(got, want, strict=True):
        _assert_same(a, e)
