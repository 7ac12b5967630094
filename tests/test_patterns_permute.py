"""Family 2: Megatron's dropless permute by routing map (masked_select and fixed-shape argsort) -> our `permute`.

The routing map comes from a top-k in the same graph, so the rewritten permute has the static size T*K: no
`masked_select`, no host sync.
"""

from __future__ import annotations

import pytest
import torch

from moe_inductor.testing.eager import megatron_permute_argsort, megatron_permute_masked_select
from rewrites import check_not_rewritten, check_rewrite

T, E, K, H = 23, 6, 2, 8
PERMUTE = "torch.ops.moe_inductor.permute.default"


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g), torch.randn(T, E, generator=g)


def _route(logits):
    """Megatron's router: top-k of the softmax, dense routing map and probs map by scatter."""
    probs, top_indices = torch.topk(torch.softmax(logits, dim=-1), K, dim=-1)
    routing_map = torch.zeros_like(logits).int().scatter(1, top_indices, 1).bool()
    routing_probs = torch.zeros_like(logits).scatter(1, top_indices, probs)
    return routing_map, routing_probs


def _static_rows(code: str) -> None:
    # One permute whose row count is the literal T*K (not None: no data-dependent size).
    assert f"{PERMUTE}(" in code and f", {T * K}, False)" in code, code


def dispatch_masked_select(x, logits):
    routing_map, _ = _route(logits)
    permuted, _, sorted_indices = megatron_permute_masked_select(x, routing_map)
    return permuted, sorted_indices


def dispatch_masked_select_probs(x, logits):
    routing_map, routing_probs = _route(logits)
    return megatron_permute_masked_select(x, routing_map, routing_probs)


def dispatch_argsort(x, logits):
    routing_map, _ = _route(logits)
    permuted, _, sorted_indices = megatron_permute_argsort(x, routing_map, num_out_tokens=x.shape[0] * K)
    return permuted, sorted_indices


def dispatch_argsort_probs(x, logits):
    routing_map, routing_probs = _route(logits)
    return megatron_permute_argsort(x, routing_map, routing_probs, num_out_tokens=x.shape[0] * K)


@pytest.mark.parametrize(
    "fn,name",
    [
        pytest.param(dispatch_masked_select, "permute_masked_select", id="masked_select"),
        pytest.param(dispatch_masked_select_probs, "permute_masked_select_probs", id="masked_select_probs"),
        pytest.param(dispatch_argsort, "permute_argsort", id="argsort"),
        pytest.param(dispatch_argsort_probs, "permute_argsort_probs", id="argsort_probs"),
    ],
)
def test_megatron_permute_is_rewritten_with_static_rows(fn, name):
    # The router makes both maps (Dynamo keeps the unused probs map; Inductor drops it later).
    expected = {"multihot_int_scatter": 1, "multihot_probs_scatter": 1, name: 1}
    check_rewrite(
        fn,
        *_inputs(),
        expected=expected,
        present=(PERMUTE,),
        absent=("masked_select", "argsort", "nonzero"),
        check=_static_rows,
        # Same rows in the same order, bit for bit (probs come from a softmax Inductor rounds its own way).
        exact=(0, 2) if "probs" in name else True,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Near misses
# ---------------------------------------------------------------------------------------------------------------------


def argsort_not_stable(x, logits):
    """Without stable=True the order of a token's equal keys is unspecified: the rewrite must not assume ours."""
    routing_map, _ = _route(logits)
    flat_sorted = routing_map.T.contiguous().reshape(-1).argsort(descending=True)[: x.shape[0] * K]
    return x.index_select(0, flat_sorted % x.shape[0])


def argsort_other_k(x, logits):
    """Cut at T*(K+1): past the routed pairs the eager argsort goes on into unrouted ones."""
    routing_map, _ = _route(logits)
    return megatron_permute_argsort(x, routing_map, num_out_tokens=x.shape[0] * (K + 1))[0]


def masked_select_token_major(x, logits):
    """The map not transposed (wrong dim): token-major rows, not Megatron's expert-major ones."""
    routing_map, _ = _route(logits)
    expert_ids = torch.arange(E).unsqueeze(0).expand(x.shape[0], -1)
    return expert_ids.masked_select(routing_map)


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(argsort_not_stable, id="argsort_not_stable"),
        pytest.param(argsort_other_k, id="argsort_cut_not_T_times_K"),
        pytest.param(masked_select_token_major, id="masked_select_not_transposed"),
    ],
)
def test_near_miss_is_not_rewritten(fn):
    # The routing map is still rewritten; the permute must not be.
    check_not_rewritten(fn, *_inputs(), expected={"multihot_int_scatter": 1, "multihot_probs_scatter": 1})
