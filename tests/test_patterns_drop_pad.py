"""Family 3: Megatron's drop-and-pad permute (per-expert `argsort(...)[:, :capacity]`) -> `permute(drop_and_pad=True)`,
and its combine (`unpermute(..., drop_and_pad=True)` with probs) -> our `unpermute`.

Capacity C = T*K // E with skewed routing: some experts drop tokens, others are padded with non-routed ones.
"""

from __future__ import annotations

import pytest
import torch

from moe_inductor.testing.eager import megatron_permute_masked_select, megatron_unpermute
from rewrites import check_not_rewritten, check_rewrite

T, E, K, H = 24, 6, 2, 8
C = T * K // E
PERMUTE = "torch.ops.moe_inductor.permute.default"
UNPERMUTE = "torch.ops.moe_inductor.unpermute.default"


def _inputs(seed=0, tokens=T):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, E, generator=g)
    logits[:, :2] += 1.5  # hot experts overflow their capacity, cold ones get padded
    return torch.randn(tokens, H, generator=g), logits


def _route(logits):
    probs, top_indices = torch.topk(torch.softmax(logits, dim=-1), K, dim=-1)
    routing_map = torch.zeros_like(logits).int().scatter(1, top_indices, 1).bool()
    routing_probs = torch.zeros_like(logits).scatter(1, top_indices, probs)
    return routing_map, routing_probs


def dispatch_drop_pad(x, logits):
    routing_map, _ = _route(logits)
    permuted, _, sorted_indices = megatron_permute_masked_select(
        x, routing_map, num_out_tokens=x.shape[0] * K, drop_and_pad=True
    )
    return permuted, sorted_indices


def test_drop_pad_permute_bit_for_bit():
    def rows(code):
        assert f"{PERMUTE}(" in code and f", {C * E}, True)" in code, code  # E*C rows, drop_and_pad

    check_rewrite(
        dispatch_drop_pad,
        *_inputs(),
        expected={"multihot_int_scatter": 1, "multihot_probs_scatter": 1, "permute_drop_pad": 1},
        present=(PERMUTE,),
        absent=("argsort",),
        check=rows,
        exact=True,
    )


def layer_drop_pad(x, logits, w):
    """Megatron's drop-and-pad path end to end: permute with probs, one expert matmul, unpermute with probs."""
    routing_map, routing_probs = _route(logits)
    permuted, permuted_probs, sorted_indices = megatron_permute_masked_select(
        x, routing_map, routing_probs, num_out_tokens=x.shape[0] * K, drop_and_pad=True
    )
    out = megatron_unpermute(permuted @ w, sorted_indices, x.shape, routing_probs, routing_map, drop_and_pad=True)
    return permuted, permuted_probs, sorted_indices, out


EXPECTED_LAYER = {
    "multihot_int_scatter": 1,
    "multihot_probs_scatter": 1,
    "permute_drop_pad_probs": 1,
    "combine_scatter_add_probs_pad": 1,
}


@pytest.mark.parametrize("dynamic_rows", [(), (0, 1)], ids=["static", "dynamic_tokens"])
def test_drop_pad_layer_with_probs(dynamic_rows):
    """Under a dynamic token count the capacity is symbolic (T*K // E); it is guarded to be >= 1."""
    x, logits = _inputs()
    check_rewrite(
        layer_drop_pad,
        x,
        logits,
        torch.randn(H, H) / H**0.5,
        expected=EXPECTED_LAYER,
        present=(PERMUTE, UNPERMUTE),
        absent=("argsort", "scatter_add"),
        dynamic_rows=dynamic_rows,
        exact=(0, 2),  # permuted rows and their token ids
    )


# ---------------------------------------------------------------------------------------------------------------------
# Near misses
# ---------------------------------------------------------------------------------------------------------------------


def _cut(x, routing_map, sort):
    sorted_indices = sort(routing_map.to(torch.int8).T.contiguous())[:, :C].contiguous().view(-1)
    return x.index_select(0, sorted_indices), sorted_indices


def not_stable(x, logits):
    """Non-stable: which tokens an over-full expert keeps is unspecified (ours keeps the lowest ids)."""
    return _cut(x, _route(logits)[0], lambda m: m.argsort(dim=-1, descending=True))


def ascending(x, logits):
    """Ascending sort: non-routed tokens first."""
    return _cut(x, _route(logits)[0], lambda m: m.argsort(dim=-1, stable=True))


def over_tokens(x, logits):
    """argsort over the experts of each token (wrong dim)."""
    routing_map = _route(logits)[0].to(torch.int8)
    sorted_indices = routing_map.argsort(dim=0, descending=True, stable=True)[:C].contiguous().view(-1)
    return x.index_select(0, sorted_indices)


def expert_choice(x, logits):
    """Expert-choice routing sorts each expert's *scores*: a float map, not routed / not routed."""
    scores = logits.softmax(-1)
    sorted_indices = scores.T.contiguous().argsort(dim=-1, descending=True, stable=True)[:, :C].reshape(-1)
    return x.index_select(0, sorted_indices)


@pytest.mark.parametrize("fn", [not_stable, ascending, over_tokens, expert_choice])
def test_near_miss_is_not_rewritten(fn):
    expected = {} if fn is expert_choice else {"multihot_int_scatter": 1, "multihot_probs_scatter": 1}
    check_not_rewritten(fn, *_inputs(), expected=expected)
