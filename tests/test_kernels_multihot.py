"""Triton kernels of `moe_inductor.kernels.multihot` against the plain-torch reference: exact equality (pure copies).

How the kernels run on CPU. `triton.jit` picks, at decoration time, an interpreted function (`TRITON_INTERPRET=1`)
or a compiled one, and that holds for Triton's own library too (`tl.zeros`, `tl.max`, ... are `@jit` functions
decorated when `triton.language` is first imported), so the variable must be set before anything imports Triton:
tests/conftest.py sets it on machines without CUDA. Where it is not set (a GPU machine) the CPU tests skip.

Outputs are "poisoned": during a CPU test the kernel module's `torch.empty` returns tensors filled with a garbage byte
and followed by a guard region, so a test sees both an element a kernel forgot to write and a write past the end.

GPU tests (`@pytest.mark.gpu`) run the ops on CUDA, where they call the real compiled kernels, and compare with CPU.
"""

from __future__ import annotations


import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from moe_inductor import ops
from moe_inductor.reference import multihot as ref
from poison import INTERPRETED, interpreted_module


@pytest.fixture
def k(monkeypatch):
    """The interpreted kernel module, with poisoned outputs whose guard regions are checked after the test."""
    module, poisoned = interpreted_module("moe_inductor.kernels.multihot", monkeypatch)
    yield module
    poisoned.check_guards()


def test_kernels_are_interpreted(k):

    assert isinstance(k._indices_to_multihot_kernel, InterpretedFunction)
    assert isinstance(k._multihot_to_indices_kernel, InterpretedFunction)


def routing(T, L, K, *, seed=0, id_dtype=torch.int64, prob_dtype=torch.float32, unrouted=0.2, foreign=0.2):
    """Distinct ids per row, some -1, some foreign (id + L, or far past L), random nonzero probs."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(T)]) if T else torch.empty(0, K).long()
    if T:
        idx[torch.rand(idx.shape, generator=g) < unrouted] = -1
        foreign_pick = (torch.rand(idx.shape, generator=g) < foreign) & (idx >= 0)
        idx[foreign_pick] += L
        far = torch.iinfo(id_dtype).max
        idx[(torch.rand(idx.shape, generator=g) < foreign / 2) & (idx >= 0)] = far
    probs = (torch.rand(T, K, generator=g) + 0.5) * torch.where(torch.rand(T, K, generator=g) < 0.5, -1.0, 1.0)
    return idx.to(id_dtype), probs.to(prob_dtype)


def rand(*shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) + 0.5).to(dtype)


def assert_same(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected)
    if actual.dtype == torch.bool:  # every byte a real 0/1, not a poison byte that happens to read as True
        assert bool((actual.view(torch.uint8) <= 1).all())


SHAPES = [
    pytest.param(37, 5, 3, id="T37_L5_K3"),
    pytest.param(1, 5, 3, id="T1"),
    pytest.param(0, 4, 2, id="T0"),
    pytest.param(6, 1, 1, id="L1"),
    pytest.param(9, 7, 7, id="K_eq_L"),
    pytest.param(23, 300, 8, id="L300_two_column_tiles"),
    pytest.param(1100, 3, 2, id="T1100_L3_two_token_tiles"),
]
DTYPES = [
    pytest.param(torch.int64, torch.float32, id="i64_f32"),
    pytest.param(torch.int32, torch.bfloat16, id="i32_bf16"),
    pytest.param(torch.int32, torch.float32, id="i32_f32"),
    pytest.param(torch.int64, torch.bfloat16, id="i64_bf16"),
]


@pytest.mark.parametrize("id_dtype,prob_dtype", DTYPES)
@pytest.mark.parametrize("T,L,K", SHAPES)
def test_indices_to_multihot(k, T, L, K, id_dtype, prob_dtype):
    indices, probs = routing(T, L, K, id_dtype=id_dtype, prob_dtype=prob_dtype)
    routing_map, probs_map = k.indices_to_multihot(indices, probs, L)
    expected_map, expected_probs = ref.indices_to_multihot(indices, probs, L)
    assert_same(routing_map, expected_map)
    assert_same(probs_map, expected_probs)
    assert int(routing_map.sum()) == int(((indices >= 0) & (indices < L)).sum())


def test_indices_to_multihot_repeated_id_keeps_last(k):
    """Repeated ids are invalid input (top-k never makes them); the scatter still gives one answer: the last k."""
    indices = torch.tensor([[2, 0, 2], [1, 1, -1], [3, 3, 3]])
    probs = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    routing_map, probs_map = k.indices_to_multihot(indices, probs, 4)
    assert torch.equal(routing_map, torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool))
    assert torch.equal(probs_map, torch.tensor([[0.2, 0, 0.3, 0], [0, 0.5, 0, 0], [0, 0, 0, 0.9]]))


@pytest.mark.parametrize("prob_dtype", [torch.float16, torch.float64])
def test_indices_to_multihot_other_float_dtypes(k, prob_dtype):
    indices, probs = routing(19, 6, 4, prob_dtype=prob_dtype, seed=3)
    for actual, expected in zip(
        k.indices_to_multihot(indices, probs, 6), ref.indices_to_multihot(indices, probs, 6), strict=True
    ):
        assert_same(actual, expected)


def test_indices_to_multihot_keeps_signed_zero_and_nan(k):
    indices = torch.tensor([[2, 0], [1, -1]])
    probs = torch.tensor([[-0.0, float("nan")], [float("inf"), 3.0]])
    _, probs_map = k.indices_to_multihot(indices, probs, 3)
    expected = torch.tensor([[float("nan"), 0.0, -0.0], [0.0, float("inf"), 0.0]])
    assert torch.equal(probs_map.view(torch.int32), expected.view(torch.int32))


def test_indices_to_multihot_all_skipped(k):
    indices = torch.tensor([[-1, 9], [4, -1]], dtype=torch.int32)  # L=4: nothing routed
    routing_map, probs_map = k.indices_to_multihot(indices, rand(2, 2), 4)
    assert_same(routing_map, torch.zeros(2, 4, dtype=torch.bool))
    assert_same(probs_map, torch.zeros(2, 4))


def test_indices_to_multihot_non_contiguous(k):
    indices, probs = routing(13, 9, 4, seed=5)
    wide = torch.full((13, 8), 7)
    wide[:, ::2] = indices  # stride (8, 2)
    probs_t = probs.t().contiguous().t()  # column-major
    for actual, expected in zip(
        k.indices_to_multihot(wide[:, ::2], probs_t, 9), ref.indices_to_multihot(indices, probs, 9), strict=True
    ):
        assert_same(actual, expected)


@pytest.mark.parametrize("id_dtype,prob_dtype", DTYPES)
@pytest.mark.parametrize("T,L,K", SHAPES)
def test_indices_to_multihot_backward(k, T, L, K, id_dtype, prob_dtype):
    indices, _ = routing(T, L, K, id_dtype=id_dtype)
    grad_map = rand(T, L, dtype=prob_dtype, seed=2)
    assert_same(k.indices_to_multihot_backward(grad_map, indices), ref.indices_to_multihot_backward(grad_map, indices))


def test_indices_to_multihot_backward_strided_grad(k):
    indices, _ = routing(11, 6, 3, seed=4)
    expanded = torch.tensor(2.5).expand(11, 6)  # what autograd hands over for probs_map.sum(): stride (0, 0)
    assert_same(k.indices_to_multihot_backward(expanded, indices), ref.indices_to_multihot_backward(expanded, indices))
    column_major = rand(6, 11, seed=3).t()
    assert_same(
        k.indices_to_multihot_backward(column_major, indices), ref.indices_to_multihot_backward(column_major, indices)
    )


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("T,L,K", SHAPES)
def test_position_map_from_indices(k, T, L, K, id_dtype):
    indices, _ = routing(T, L, K, id_dtype=id_dtype)
    assert_same(k.position_map_from_indices(indices, L), ref.position_map_from_indices(indices, L))


@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32, torch.int16, torch.int8])
@pytest.mark.parametrize("prob_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,L,K", SHAPES)
def test_multihot_to_indices(k, T, L, K, prob_dtype, pos_dtype):
    indices, _ = routing(T, L, K)
    position_map = ref.position_map_from_indices(indices, L).to(pos_dtype)
    probs_map = rand(T, L, dtype=prob_dtype)  # nonzero everywhere: only the routed columns may be picked
    assert_same(k.multihot_to_indices(probs_map, position_map, K), ref.multihot_to_indices(probs_map, position_map, K))


@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32, torch.int16, torch.int8])
@pytest.mark.parametrize("prob_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,L,K", SHAPES)
def test_multihot_to_indices_backward(k, T, L, K, prob_dtype, pos_dtype):
    indices, _ = routing(T, L, K)
    position_map = ref.position_map_from_indices(indices, L).to(pos_dtype)
    grad = rand(T, K, dtype=prob_dtype, seed=3)
    assert_same(
        k.multihot_to_indices_backward(grad, position_map), ref.multihot_to_indices_backward(grad, position_map)
    )


def test_multihot_to_indices_skips_out_of_range_positions(k):
    """Unchecked input (the CPU op rejects it, device kernels skip it): positions < -1 or >= topk are ignored."""
    position_map = torch.tensor([[0, 5, -7, 1, 2], [2**40, -1, 1, -(2**40), 0]])
    probs_map = rand(2, 5)
    assert_same(k.multihot_to_indices(probs_map, position_map, 2), ref.multihot_to_indices(probs_map, position_map, 2))
    grad = rand(2, 2, seed=4)
    assert_same(
        k.multihot_to_indices_backward(grad, position_map), ref.multihot_to_indices_backward(grad, position_map)
    )


def test_multihot_to_indices_non_contiguous_and_more_slots_than_experts(k):
    indices, _ = routing(10, 4, 3, seed=6)
    position_map = ref.position_map_from_indices(indices, 4).t().contiguous().t()
    probs_map = rand(4, 10, seed=2).t()
    # topk 6 > L: slots no expert fills come out 0.
    assert_same(k.multihot_to_indices(probs_map, position_map, 6), ref.multihot_to_indices(probs_map, position_map, 6))
    grad = rand(6, 10, seed=5).t()
    assert_same(
        k.multihot_to_indices_backward(grad, position_map), ref.multihot_to_indices_backward(grad, position_map)
    )


# ---------------------------------------------------------------------------------------------------------------------
# GPU: the ops on CUDA (real compiled kernels) against the CPU reference
# ---------------------------------------------------------------------------------------------------------------------

GPU_SHAPES = [
    pytest.param(16384, 256, 8, id="T16384_L256_K8"),
    pytest.param(37, 5, 3, id="T37_L5_K3"),
    pytest.param(1, 300, 8, id="T1_L300"),
    pytest.param(0, 4, 2, id="T0"),
    pytest.param(4099, 1, 1, id="L1"),
    pytest.param(513, 7, 7, id="K_eq_L"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("id_dtype,prob_dtype", DTYPES)
@pytest.mark.parametrize("T,L,K", GPU_SHAPES)
def test_gpu_ops_match_cpu(T, L, K, id_dtype, prob_dtype):
    if INTERPRETED:
        pytest.skip("this process interprets Triton; the GPU tests are for the compiled kernels")
    indices, probs = routing(T, L, K, id_dtype=id_dtype, prob_dtype=prob_dtype, seed=7)
    grad_map = rand(T, L, dtype=prob_dtype, seed=8)
    grad_probs = rand(T, K, dtype=prob_dtype, seed=9)
    position_map = ref.position_map_from_indices(indices, L)

    def run(device):
        p = probs.to(device).requires_grad_()
        routing_map, probs_map = ops.indices_to_multihot(indices.to(device), p, L)
        (g,) = torch.autograd.grad(probs_map, p, grad_map.to(device))
        pm = probs_map.detach().requires_grad_()
        back = ops.multihot_to_indices(pm, position_map.to(device), K)
        (g2,) = torch.autograd.grad(back, pm, grad_probs.to(device))
        return [t.cpu() for t in (routing_map, probs_map.detach(), g, back.detach(), g2)]

    for actual, expected in zip(run("cuda"), run("cpu"), strict=True):
        assert_same(actual, expected)


@pytest.mark.gpu
def test_gpu_kernels_skip_unchecked_ids():
    """Ids < -1 and repeated foreign ids are not validated on CUDA (a host sync); the kernels skip them."""
    from moe_inductor import kernels

    indices, probs = routing(300, 6, 4, seed=11)
    indices[::7, 0] = -5
    cuda = kernels.multihot.indices_to_multihot(indices.cuda(), probs.cuda(), 6)
    for actual, expected in zip(cuda, ref.indices_to_multihot(indices, probs, 6), strict=True):
        assert_same(actual.cpu(), expected)


@pytest.mark.gpu
def test_gpu_indices_to_multihot_compiled():
    """Under torch.compile the launches go through wrap_triton (dynamic token count), forward and backward."""
    indices, probs = routing(1000, 64, 6, seed=12)
    grad_map = rand(1000, 64, seed=13)

    def fwd_bwd(i, p, g):
        p = p.detach().requires_grad_()
        routing_map, probs_map = ops.indices_to_multihot(i, p, 64)
        (grad,) = torch.autograd.grad(probs_map, p, g)
        return routing_map, probs_map.detach(), grad

    compiled = torch.compile(fwd_bwd, dynamic=True)
    for T in (1000, 333):  # a second token count reuses the dynamic graph
        out = compiled(indices[:T].cuda(), probs[:T].cuda(), grad_map[:T].cuda())
        expected = fwd_bwd(indices[:T], probs[:T], grad_map[:T])
        for actual, e in zip(out, expected, strict=True):
            assert_same(actual.cpu(), e)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_indices_to_multihot_past_2_31_elements():
    L, K = 256, 8
    T = 2**31 // L + 5  # the last rows of the [T, L] outputs start past 2**31 elements
    g = torch.Generator(device="cuda").manual_seed(0)
    indices = torch.randint(-1, L, (T, K), device="cuda", dtype=torch.int32, generator=g)
    indices[:, 1:] = (indices[:, :1] + torch.arange(1, K, device="cuda", dtype=torch.int32)) % L  # distinct per row
    probs = torch.rand(T, K, device="cuda", generator=g).to(torch.bfloat16)
    routing_map, probs_map = ops.indices_to_multihot(indices, probs, L)
    tail = slice(T - 9, T)
    expected_map, expected_probs = ref.indices_to_multihot(indices[tail].cpu(), probs[tail].cpu(), L)
    assert_same(routing_map[tail].cpu(), expected_map)
    assert_same(probs_map[tail].cpu(), expected_probs)
