"""indices_to_multihot / multihot_to_indices: the seed 000 examples, a loop oracle, gradients, errors."""

from __future__ import annotations

import pytest
import torch

from moe_inductor import ops
from oracles import multihot_loop
from samples import topk_routing


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_seed_000_indices_to_multihot_example(id_dtype):
    """Seed 000 prints the map as 1/-1; the real output is bool (True where it prints 1)."""
    indices = torch.tensor([[0, 1], [1, 2]], dtype=id_dtype)
    probs = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    routing_map, probs_map = ops.fused_indices_to_multihot(indices, probs, 4)
    printed = torch.tensor([[1, 1, -1, -1], [-1, 1, 1, -1]])
    assert routing_map.dtype == torch.bool
    assert torch.equal(routing_map, printed == 1)
    assert torch.equal(probs_map, torch.tensor([[0.1, 0.2, 0.0, 0.0], [0.0, 0.3, 0.4, 0.0]]))


def test_seed_000_multihot_to_indices_example():
    """Seed 000 prints the position map in the same 1/-1 style; the real map holds each expert's slot k."""
    probs_in_multihot = torch.tensor([[0.7, 0.8, 0.0, 0.0], [0.0, 0.1, 0.9, 0.0]])
    indices = torch.tensor([[0, 1], [1, 2]])  # the routing behind the printed map [[1, 1, -1, -1], [-1, 1, 1, -1]]
    position_map = ops.position_map(indices, 4)
    assert torch.equal(position_map, torch.tensor([[0, 1, -1, -1], [-1, 0, 1, -1]]))
    out = ops.multihot_to_indices(probs_in_multihot, position_map, 2)
    assert torch.equal(out, torch.tensor([[0.7, 0.8], [0.1, 0.9]]))
    # Taken literally, the printed map puts two experts in slot 1 of each row: rejected, naming the argument.
    with pytest.raises(ValueError, match="'position_map' row 0 names the same position twice"):
        ops.multihot_to_indices(probs_in_multihot, torch.tensor([[1, 1, -1, -1], [-1, 1, 1, -1]]), 2)


@pytest.mark.parametrize(
    "T,L,K,kw",
    [
        pytest.param(37, 11, 5, {}, id="T37_L11_K5"),
        pytest.param(29, 6, 4, dict(unrouted=0.3, foreign=0.3, seed=1), id="unrouted_and_foreign_ids"),
        pytest.param(
            17, 9, 3, dict(skew=True, seed=2, id_dtype=torch.int32, prob_dtype=torch.bfloat16), id="skew_bf16"
        ),
        pytest.param(6, 1, 1, {}, id="one_expert"),
        pytest.param(0, 4, 2, {}, id="T0"),
    ],
)
def test_matches_loop_and_round_trips(T, L, K, kw):
    indices, probs = topk_routing(T, L, K, **kw)
    routing_map, probs_map = ops.indices_to_multihot(indices, probs, L)
    expected_map, expected_probs = multihot_loop(indices, probs, L)
    assert torch.equal(routing_map, expected_map)
    assert torch.equal(probs_map, expected_probs)
    back = ops.multihot_to_indices(probs_map, ops.position_map(indices, L), K)
    routed = (indices >= 0) & (indices < L)
    assert torch.equal(back, torch.where(routed, probs, 0))


def test_backward_gathers_routed_entries_only():
    indices = torch.tensor([[2, -1, 0], [5, 1, 3]])  # -1 unrouted, 5 belongs to another rank (L=4)
    probs = torch.rand(2, 3, requires_grad=True)
    _, probs_map = ops.indices_to_multihot(indices, probs, 4)
    grad_map = torch.arange(8.0).view(2, 4)
    (grad,) = torch.autograd.grad(probs_map, probs, grad_map)
    assert torch.equal(grad, torch.tensor([[2.0, 0.0, 0.0], [0.0, 5.0, 7.0]]))


def test_multihot_to_indices_backward_scatters_to_positions():
    position_map = torch.tensor([[1, -1, 0], [-1, 0, -1]])
    probs_map = torch.rand(2, 3, requires_grad=True)
    out = ops.multihot_to_indices(probs_map, position_map, 2)
    (grad,) = torch.autograd.grad(out, probs_map, torch.tensor([[10.0, 20.0], [30.0, 40.0]]))
    assert torch.equal(grad, torch.tensor([[20.0, 0.0, 10.0], [0.0, 30.0, 0.0]]))


def test_errors():
    indices = torch.tensor([[0, 1], [1, 2]])
    probs = torch.rand(2, 2)
    with pytest.raises(ValueError, match="'indices' holds -2"):
        ops.indices_to_multihot(torch.tensor([[0, -2], [1, 2]]), probs, 4)
    with pytest.raises(ValueError, match="'indices' row 1 names the same expert id twice"):
        ops.indices_to_multihot(torch.tensor([[0, 1], [2, 2]]), probs, 4)
    ops.indices_to_multihot(torch.tensor([[0, 1], [7, 7]]), probs, 4)  # repeated foreign ids are skipped, fine
    with pytest.raises(TypeError, match="'indices' must have dtype"):
        ops.indices_to_multihot(indices.float(), probs, 4)
    with pytest.raises(TypeError, match="'probs' must have dtype"):
        ops.indices_to_multihot(indices, probs.long(), 4)
    with pytest.raises(ValueError, match="'probs' must have shape"):
        ops.indices_to_multihot(indices, probs[:1], 4)
    with pytest.raises(ValueError, match="'num_local_experts' must be > 0"):
        ops.indices_to_multihot(indices, probs, 0)
    with pytest.raises(ValueError, match="'indices' must be 2-D"):
        ops.indices_to_multihot(indices.flatten(), probs.flatten(), 4)
    with pytest.raises(ValueError, match="'position_map' holds position 2, must be < topk=2"):
        ops.multihot_to_indices(torch.rand(1, 3), torch.tensor([[0, 2, -1]]), 2)
    with pytest.raises(ValueError, match="'topk' must be > 0"):
        ops.multihot_to_indices(torch.rand(1, 3), torch.tensor([[0, 1, -1]]), 0)
