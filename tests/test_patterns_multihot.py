"""Family 1: dense routing / probs maps from top-k ids -> `indices_to_multihot`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rewrites import check_not_rewritten, check_rewrite, compile_and_compare
from samples import topk_routing

E, K = 6, 2
MULTIHOT = "torch.ops.moe_inductor.indices_to_multihot.default"


def _logits(tokens=19, experts=E, seed=0):
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))


def megatron_router(logits):
    """Megatron `topk_routing_with_score_function`: int scatter for the map, scatter of the probs."""
    probs, top_indices = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), K, dim=1)
    routing_probs = torch.zeros_like(logits).scatter(1, top_indices, probs)
    routing_map = torch.zeros_like(logits).int().scatter(1, top_indices, 1).bool()
    return routing_probs, routing_map


def test_megatron_int_scatter_and_probs_scatter():
    check_rewrite(
        megatron_router,
        _logits(),
        expected={"multihot_int_scatter": 1, "multihot_probs_scatter": 1},
        present=(MULTIHOT, MULTIHOT),
        absent=("scatter",),
    )


def hf_router_mask(logits, hidden):
    """HF / torchtitan style: a bool mask scattered with True, used to keep the routed experts' logits."""
    _, selected = torch.topk(logits, K, dim=-1)
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter(1, selected, True)
    return logits.masked_fill(~mask, float("-inf")).softmax(-1) @ hidden


def test_hf_bool_scatter():
    check_rewrite(
        hf_router_mask,
        _logits(),
        torch.randn(E, 5),
        expected={"multihot_bool_scatter": 1},
        present=(MULTIHOT,),
        absent=("scatter",),
    )


def switch_aux_loss(logits):
    """Switch / GShard load-balancing loss: the expert mask of each token is F.one_hot(ids, E).sum(1)."""
    probs = logits.softmax(-1)
    _, selected = torch.topk(probs, K, dim=-1)
    mask = F.one_hot(selected, num_classes=E).sum(1)
    tokens_per_expert = mask.float().mean(0)
    return (tokens_per_expert * probs.mean(0)).sum() * E


def test_switch_one_hot_sum():
    check_rewrite(
        switch_aux_loss,
        _logits(),
        expected={"multihot_one_hot_sum": 1},
        present=(MULTIHOT,),
        absent=("one_hot",),
    )


def flex_indices_to_multihot(indices, probs):
    """Megatron's flex dispatcher `_indices_to_multihot`: -1 marks experts of other ranks."""
    batch_size = indices.shape[0]
    routing_map = torch.zeros((batch_size, E), dtype=torch.long, device=indices.device)
    probs_map = torch.zeros((batch_size, E), dtype=torch.float, device=indices.device)
    mask = indices != -1
    valid_indices = indices[mask]
    row_indices = torch.arange(batch_size, device=indices.device).repeat_interleave(mask.sum(dim=1))
    routing_map[row_indices, valid_indices] = 1
    probs_map[row_indices, valid_indices] = probs[mask]
    return routing_map.bool(), probs_map


def test_flex_masked_assignment_without_host_sync():
    indices, probs = topk_routing(23, E, 3, unrouted=0.3, seed=4)
    check_rewrite(
        flex_indices_to_multihot,
        indices,
        probs,
        expected={"multihot_masked_assignment": 1},
        present=(MULTIHOT,),
        # The boolean-mask gathers and repeat_interleave have data-dependent sizes (host syncs on GPU).
        absent=("repeat_interleave", "index_put", "setitem"),
    )


@pytest.mark.slow
def test_symbolic_expert_count_is_specialized_under_dynamic_true():
    """dynamic=True makes E symbolic too; the op takes an int, so E is specialized (guarded), T stays dynamic."""
    got = compile_and_compare(megatron_router, _logits(), dynamic=True)
    assert got == {"multihot_int_scatter": 1, "multihot_probs_scatter": 1}


# ---------------------------------------------------------------------------------------------------------------------
# Near misses
# ---------------------------------------------------------------------------------------------------------------------


def scatter_on_dim0(logits):
    probs, top_indices = torch.topk(logits.softmax(-1), K, dim=1)
    return torch.zeros_like(logits).scatter(0, top_indices, probs)


def probs_scatter_of_given_ids(logits, ids):
    """Ids not from a top-k may repeat within a row: scatter keeps an arbitrary one, the op rejects them."""
    return torch.zeros_like(logits).scatter(1, ids, logits.softmax(-1).gather(1, ids))


def one_hot_sum_over_tokens(logits):
    _, selected = torch.topk(logits, K, dim=-1)
    return F.one_hot(selected, num_classes=E).sum(0)  # [K, E] per-slot counts, not a [T, E] map


def flex_wrong_sentinel(indices, probs):
    """Masks out expert 0 instead of -1: a different map."""
    routing_map = torch.zeros((indices.shape[0], E), dtype=torch.long)
    mask = indices != 0
    rows = torch.arange(indices.shape[0]).repeat_interleave(mask.sum(dim=1))
    routing_map[rows, indices[mask]] = 1
    return routing_map.bool()


@pytest.mark.parametrize(
    "fn,args",
    [
        pytest.param(scatter_on_dim0, (_logits(),), id="scatter_dim0"),
        pytest.param(probs_scatter_of_given_ids, (_logits(), torch.randint(0, E, (19, K))), id="ids_not_from_topk"),
        pytest.param(one_hot_sum_over_tokens, (_logits(),), id="one_hot_sum_dim0"),
        pytest.param(flex_wrong_sentinel, topk_routing(23, E, 3, unrouted=0.3, seed=4), id="mask_not_minus_one"),
    ],
)
def test_near_miss_is_not_rewritten(fn, args):
    check_not_rewritten(fn, *args)
