"""Family 5: combine (scatter_add_ / index_add_ of expert rows into their tokens, gather-weight-sum) -> our
`unpermute` / `moe_finalize_routing`. The drop-and-pad combine is in test_patterns_drop_pad.py, torchtitan's
`zeros_like(...).scatter_add` in test_patterns_init_routing.py."""

from __future__ import annotations

import pytest
import torch

from moe_inductor.testing.eager import megatron_permute_masked_select, megatron_unpermute
from rewrites import check_not_rewritten, check_rewrite
from samples import routing_map

T, E, K, H = 19, 6, 2, 8
UNPERMUTE = "torch.ops.moe_inductor.unpermute.default"
FINALIZE = "torch.ops.moe_inductor.moe_finalize_routing.default"


def _dispatched(seed=0):
    """Expert outputs in Megatron's permuted order, with the routing that produced them (built eagerly)."""
    g = torch.Generator().manual_seed(seed)
    rmap, probs = routing_map(T, E, K, seed=seed)
    x = torch.randn(T, H, generator=g)
    _, _, sorted_indices = megatron_permute_masked_select(x, rmap, probs)
    return torch.randn(sorted_indices.shape[0], H, generator=g), sorted_indices, probs, rmap


def unpermute_no_probs(hidden, sorted_indices):
    return megatron_unpermute(hidden, sorted_indices, (T, H))


def unpermute_probs(hidden, sorted_indices, probs, rmap):
    return megatron_unpermute(hidden, sorted_indices, (T, H), probs, rmap)


def index_add_combine(hidden, sorted_indices, probs, rmap):
    """Weight each row by its prob, then sum rows into their tokens with index_add_ (a common hand-written form)."""
    weights = probs.T.contiguous().masked_select(rmap.T.contiguous())
    out = torch.zeros((T, H), dtype=hidden.dtype, device=hidden.device)
    return out.index_add_(0, sorted_indices, hidden * weights.unsqueeze(-1))


@pytest.mark.parametrize(
    "fn,nargs,name",
    [
        pytest.param(unpermute_no_probs, 2, "combine_scatter_add", id="megatron_scatter_add"),
        pytest.param(unpermute_probs, 4, "combine_scatter_add_probs", id="megatron_scatter_add_probs"),
        pytest.param(index_add_combine, 4, "combine_index_add", id="index_add"),
    ],
)
def test_scatter_add_and_index_add(fn, nargs, name):
    # index_add_ keeps the (data-dependent) masked_select of the weights: only the sum is rewritten.
    absent = ("scatter_add", "index_add") if name != "combine_scatter_add_probs" else ("scatter_add", "masked_select")
    check_rewrite(fn, *_dispatched()[:nargs], expected={name: 1}, present=(UNPERMUTE,), absent=absent)


def vllm_reference_combine(expert_out, rows, topk_weights):
    """vLLM / HF reference MoEs: gather each token's K rows, weight, sum over K (finalize mode 2 layout)."""
    num_tokens = topk_weights.shape[0]
    return (expert_out[rows].view(num_tokens, K, expert_out.shape[1]) * topk_weights[..., None]).sum(1)


def test_gather_weight_sum_is_finalize():
    g = torch.Generator().manual_seed(3)
    check_rewrite(
        vllm_reference_combine,
        torch.randn(T * K, H, generator=g),
        torch.randperm(T * K, generator=g),
        torch.rand(T, K, generator=g),
        expected={"combine_gather_weight_sum": 1},
        present=(FINALIZE,),
        absent=("index_select",),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Near misses
# ---------------------------------------------------------------------------------------------------------------------


def scatter_add_dim1(hidden, sorted_indices):
    out = torch.zeros((hidden.shape[0], 2 * H), dtype=hidden.dtype)
    return out.scatter_add_(1, sorted_indices.remainder(H).unsqueeze(1).expand(-1, H), hidden)


def scatter_add_half_the_columns(hidden, sorted_indices):
    """Rows of H // 2 columns added into the first half of an [T, H] output."""
    out = torch.zeros((T, H), dtype=hidden.dtype)
    return out.scatter_add_(0, sorted_indices.unsqueeze(1).expand(-1, H // 2), hidden[:, : H // 2])


def index_add_into_residual(hidden, sorted_indices):
    """HF adds expert rows into a buffer that already holds values (not a fresh zeros): not our combine."""
    out = torch.ones((T, H), dtype=hidden.dtype) * 0.5
    return out.index_add_(0, sorted_indices, hidden)


def shared_gate(expert_out, rows, topk_weights):
    """One weight per token broadcast over K ([T, 1]), not one per (token, k)."""
    return (expert_out[rows].view(T, K, H) * topk_weights[:, :1, None]).sum(1)


def _gathered(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T * K, H, generator=g), torch.randperm(T * K, generator=g), torch.rand(T, K, generator=g)


@pytest.mark.parametrize(
    "fn,args",
    [
        pytest.param(scatter_add_dim1, _dispatched()[:2], id="scatter_add_dim1"),
        pytest.param(scatter_add_half_the_columns, _dispatched()[:2], id="index_narrower_than_rows"),
        pytest.param(index_add_into_residual, _dispatched()[:2], id="index_add_not_into_zeros"),
        pytest.param(shared_gate, _gathered(), id="weights_not_per_k"),
    ],
)
def test_near_miss_is_not_rewritten(fn, args):
    check_not_rewritten(fn, *args)
