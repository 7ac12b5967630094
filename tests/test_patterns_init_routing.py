"""Family 4: sort-based dispatch (stable argsort of the flat top-k ids, `// K`, gather) and expert counts
(bincount / histc / cumsum) -> one `moe_init_routing_v2` call (dropless, scatter-form row index)."""

from __future__ import annotations

import pytest
import torch

from rewrites import check_not_rewritten, check_rewrite

T, E, K, H = 21, 6, 2, 8
INIT = "torch.ops.moe_inductor.moe_init_routing_v2.default"
UNPERMUTE = "torch.ops.moe_inductor.unpermute.default"
FINALIZE = "torch.ops.moe_inductor.moe_finalize_routing.default"


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g), torch.randn(T, E, generator=g), torch.randn(H, H, generator=g) / H**0.5


def _one_call(code: str) -> None:
    # Dispatch and counts share one call (one sort): counts flag on, scatter-form row index.
    assert code.count(INIT) == 1, code


def torchtitan_moe(x, logits, w):
    """torchtitan's TokenChoiceTopKRouter + MoE forward: histc counts, stable argsort, gather, scatter_add."""
    scores = torch.sigmoid(logits)
    top_scores, selected_experts_indices = torch.topk(scores, k=K, dim=1)
    num_tokens_per_expert = torch.histc(selected_experts_indices.view(-1).float(), bins=E, min=0, max=E)
    token_indices_experts_sorted = torch.argsort(selected_experts_indices.view(-1), stable=True)
    top_scores_experts_sorted = top_scores.view(-1)[token_indices_experts_sorted]
    token_indices_experts_sorted = token_indices_experts_sorted // K
    token_indices_experts_sorted = token_indices_experts_sorted.reshape(-1, 1).expand(-1, x.shape[1])
    routed_input = torch.gather(x, dim=0, index=token_indices_experts_sorted)
    routed_output = routed_input @ w
    routed_output = (routed_output.to(torch.float32) * top_scores_experts_sorted.reshape(-1, 1)).to(x.dtype)
    out = torch.zeros_like(x)
    out = out.scatter_add(dim=0, index=token_indices_experts_sorted, src=routed_output)
    return out, num_tokens_per_expert


def test_torchtitan_histc_argsort_gather_scatter_add():
    check_rewrite(
        torchtitan_moe,
        *_inputs(),
        expected={
            "init_routing_sort_gather": 1,
            "init_routing_histc": 1,
            "combine_scatter_add_zeros_like": 1,
        },
        present=(INIT, UNPERMUTE),
        absent=("Tensor_argsort", "histc", "Tensor_gather", "scatter_add"),
        check=_one_call,
        exact=(1,),  # counts
    )


def sorted_dispatch_gather_combine(x, logits, w):
    """A reference MoE (DeepSeek / vLLM style, with a stable sort): x[order // K], bincount counts, and the
    combine gathers each token's K rows through the inverse permutation and sums them weighted."""
    weights, topk_ids = torch.softmax(logits, dim=-1).topk(K, dim=-1)
    idxs = topk_ids.view(-1).argsort(stable=True)
    tokens_per_expert = torch.bincount(topk_ids.view(-1), minlength=E)
    sorted_tokens = x[idxs // topk_ids.shape[1]]
    expert_out = torch.relu(sorted_tokens @ w)
    rows = idxs.argsort()  # row of copy t*K + k
    out = (expert_out[rows].view(x.shape[0], K, x.shape[1]) * weights[..., None]).sum(1)
    return out, tokens_per_expert, sorted_tokens


@pytest.mark.parametrize("dynamic_rows", [(), (0, 1)], ids=["static", "dynamic_tokens"])
def test_sorted_dispatch_bincount_and_gather_weight_sum(dynamic_rows):
    check_rewrite(
        sorted_dispatch_gather_combine,
        *_inputs(),
        expected={
            "init_routing_sort_index_select": 1,
            "init_routing_bincount": 1,
            "combine_gather_weight_sum": 1,
        },
        present=(INIT, FINALIZE),
        absent=("bincount",),
        check=_one_call,
        dynamic_rows=dynamic_rows,
        exact=(1, 2),  # counts and dispatched rows
    )


def offsets_for_grouped_mm(x, logits):
    """Dispatch plus per-expert end offsets (what a grouped GEMM takes), and the counts themselves."""
    _, topk_ids = torch.topk(logits, K)
    order = torch.sort(topk_ids.flatten(), stable=True)[1]
    routed = x.index_select(0, torch.div(order, K, rounding_mode="floor"))
    offsets = torch.bincount(topk_ids.flatten(), minlength=E).cumsum(0)
    counts = torch.bincount(topk_ids.flatten(), minlength=E)
    return routed, offsets, counts


def test_bincount_cumsum_offsets_share_the_sort():
    check_rewrite(
        offsets_for_grouped_mm,
        *_inputs()[:2],
        expected={
            "init_routing_sort_index_select": 1,
            "init_routing_bincount_cumsum": 1,
            "init_routing_bincount": 1,
        },
        present=(INIT,),
        absent=("bincount", "Tensor_argsort", "Tensor_sort"),
        check=_one_call,
        exact=True,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Near misses
# ---------------------------------------------------------------------------------------------------------------------


def not_stable(x, logits):
    """DeepSeek's HF `moe_infer` sorts without stable=True: the order within an expert is unspecified."""
    _, topk_ids = torch.topk(logits, K)
    idxs = topk_ids.view(-1).argsort()
    return x[idxs // K]


def other_k(x, logits):
    _, topk_ids = torch.topk(logits, K)
    return x[topk_ids.view(-1).argsort(stable=True) // (K + 1)]


def other_e(x, logits):
    _, topk_ids = torch.topk(logits, K)
    return torch.bincount(topk_ids.view(-1), minlength=E + 2)  # E + 2 counts, the last two zero


def histc_other_range(x, logits):
    _, topk_ids = torch.topk(logits, K)
    return torch.histc(topk_ids.view(-1).float(), bins=E, min=0, max=E - 1)


def ids_not_from_topk(x, ids):
    """Ids from elsewhere (here all in [0, E)) may be -1 or >= E: argsort puts -1 first, the op puts it last."""
    return x[ids.view(-1).argsort(stable=True) // K], torch.bincount(ids.view(-1), minlength=E)


def narrower_gather(x, logits):
    _, topk_ids = torch.topk(logits, K)
    token = topk_ids.view(-1).argsort(stable=True) // K
    return torch.gather(x, 0, token.unsqueeze(1).expand(-1, x.shape[1] - 1))


@pytest.mark.parametrize(
    "fn,args",
    [
        pytest.param(not_stable, _inputs()[:2], id="argsort_not_stable"),
        pytest.param(other_k, _inputs()[:2], id="divides_by_other_k"),
        pytest.param(other_e, _inputs()[:2], id="bincount_minlength_not_E"),
        pytest.param(histc_other_range, _inputs()[:2], id="histc_range_not_0_E"),
        pytest.param(ids_not_from_topk, (_inputs()[0], torch.randint(0, E, (T, K))), id="ids_not_from_topk"),
        pytest.param(narrower_gather, _inputs()[:2], id="gather_fewer_columns"),
    ],
)
def test_near_miss_is_not_rewritten(fn, args):
    check_not_rewritten(fn, *args)
