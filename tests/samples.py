"""Sample calls of every op, for the generic checks (opcheck, gradcheck, torch.compile).

Each op gets samples that cover what breaks kernels: T=0, K and E not powers of two, one expert, `-1` and foreign
ids, skewed routing, drop-and-pad with under- and over-full experts, fp32 and bf16, int32 and int64 ids. Data is
random (never zeros) and built with the test oracles, not with the ops under test. Floating inputs the op
differentiates are created with `requires_grad=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moe_inductor.ops.init_routing import InitRoutingArgs
from oracles import init_routing_loop, megatron_permute_masked_select, multihot_loop, npu_permute_formula

F32, BF16 = torch.float32, torch.bfloat16


@dataclass
class Sample:
    name: str
    args: tuple
    compile: bool = False  # also part of the (slower) torch.compile checks


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape, dtype=F32, seed=0, grad=False) -> torch.Tensor:
    t = torch.randn(*shape, generator=_gen(seed)).to(dtype)
    return t.requires_grad_(grad)


def topk_routing(
    num_tokens,
    num_experts,
    topk,
    *,
    seed=0,
    skew=False,
    unrouted=0.0,
    foreign=0.0,
    id_dtype=torch.int64,
    prob_dtype=F32,
):
    """Top-k of a softmax over random logits; optionally a few hot experts, `-1` ids and ids of other ranks."""
    g = _gen(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    if skew:
        logits[:, : max(1, num_experts // 4)] += 4.0
    probs, idx = logits.softmax(-1).topk(topk, dim=-1)
    if unrouted:
        idx[torch.rand(idx.shape, generator=g) < unrouted] = -1
    if foreign:
        pick = (torch.rand(idx.shape, generator=g) < foreign) & (idx >= 0)
        idx[pick] += num_experts
    return idx.to(id_dtype), probs.to(prob_dtype)


def routing_map(num_tokens, num_experts, topk, **kw):
    """(bool routing map, dense probs map) of a top-k routing, built by the loop oracle."""
    idx, probs = topk_routing(num_tokens, num_experts, topk, **kw)
    return multihot_loop(idx, probs, num_experts)


def _grad(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


# ---------------------------------------------------------------------------------------------------------------------


def _multihot():
    out = []
    for name, (T, L, K), kw in [
        ("T7_L6_K3_i32_f32", (7, 6, 3), dict(id_dtype=torch.int32)),
        ("T13_L5_K3_i64_bf16_unrouted_foreign", (13, 5, 3), dict(unrouted=0.3, foreign=0.3, prob_dtype=BF16)),
        ("T13_L7_K2_skewed", (13, 7, 2), dict(skew=True, seed=3)),
        ("T5_L1_K1_one_expert", (5, 1, 1), {}),
        ("T0_L5_K2", (0, 5, 2), {}),
    ]:
        idx, probs = topk_routing(T, L, K, **kw)
        out.append(Sample(name, (idx, _grad(probs), L), compile=name.startswith("T13_L5")))
    return out


def _multihot_to_indices():
    out = []
    for name, (T, L, K), kw in [
        ("T7_L6_K3_f32", (7, 6, 3), {}),
        ("T13_L5_K3_bf16_unrouted", (13, 5, 3), dict(unrouted=0.3, prob_dtype=BF16)),
        ("T0_L4_K2", (0, 4, 2), {}),
    ]:
        idx, probs = topk_routing(T, L, K, **kw)
        _, probs_map = multihot_loop(idx, probs, L)
        position = torch.full((T, L), -1, dtype=torch.int32)
        for t in range(T):
            for k in range(K):
                if 0 <= idx[t, k] < L:
                    position[t, idx[t, k]] = k
        out.append(Sample(name, (_grad(probs_map), position, K), compile=name.startswith("T13")))
    return out


def _npu_permute():
    out = []
    cases = [
        # name, T, E, K, probs dtype / None, num_out_tokens, drop_and_pad, routing kw
        ("dropless_T7_E5_K3_f32", 7, 5, 3, F32, 21, False, {}),
        ("dropless_T13_E6_K2_bf16_noprobs_int8map", 13, 6, 2, None, 26, False, dict(seed=1)),
        ("dropless_default_num_out_K1", 7, 5, 1, F32, None, False, dict(seed=2)),
        ("pad_underfull_C4", 7, 5, 2, F32, 20, True, dict(seed=4)),
        ("pad_overfull_C1_skewed", 13, 6, 3, BF16, 6, True, dict(skew=True, seed=5)),
        ("pad_unrouted", 9, 4, 2, F32, 12, True, dict(unrouted=0.4, seed=6)),
        ("one_expert_dropless", 5, 1, 1, F32, 5, False, {}),
        ("one_expert_pad_C3", 5, 1, 1, F32, 3, True, {}),
        ("T0_dropless", 0, 5, 2, F32, 0, False, {}),
        ("T0_pad", 0, 5, 2, F32, 0, True, {}),
    ]
    for name, T, E, K, pdt, n, pad, kw in cases:
        rmap, pmap = routing_map(T, E, K, **kw)
        if "int8map" in name:
            rmap = rmap.to(torch.int8)
        tokens_dtype = pdt if pdt is not None else BF16
        tokens = rand(T, 10, dtype=tokens_dtype, seed=T + E, grad=True)
        probs = _grad(pmap.to(pdt)) if pdt is not None else None
        out.append(
            Sample(name, (tokens, rmap, probs, n, pad), compile=name in ("dropless_T7_E5_K3_f32", "pad_underfull_C4"))
        )
    return out


def _npu_unpermute():
    out = []
    for s in _npu_permute():
        tokens, rmap, probs, n, pad = s.args
        _, _, sorted_indices = npu_permute_formula(tokens.detach(), rmap, None, n, pad)
        permuted = rand(sorted_indices.shape[0], tokens.shape[1], dtype=tokens.dtype, seed=11, grad=True)
        out.append(
            Sample(
                s.name,
                (permuted, sorted_indices, [tokens.shape[0], tokens.shape[1]], probs, rmap, pad),
                compile=s.compile,
            )
        )
    return out


def _megatron_permute():
    out = []
    cases = [
        ("masked_select_unrouted_f32", 13, 6, 3, F32, None, False, dict(unrouted=0.3, seed=7)),
        ("static_count_T7_E5_K3", 7, 5, 3, F32, "count", False, {}),
        ("argsort_truncated", 9, 5, 2, F32, 11, False, dict(unrouted=0.2, seed=8)),
        ("argsort_fillers", 9, 5, 2, F32, 20, False, dict(unrouted=0.2, seed=8)),
        ("bf16_noprobs_int8map", 11, 6, 2, None, "count", False, dict(seed=9)),
        ("pad_underfull", 7, 5, 2, F32, 20, True, dict(seed=4)),
        ("pad_overfull_skewed", 13, 6, 3, BF16, 6, True, dict(skew=True, seed=5)),
        ("pad_capacity_above_T", 4, 3, 2, F32, 30, True, dict(seed=10)),
        ("drop_and_pad_without_num_out", 7, 5, 2, F32, None, True, dict(seed=4)),
        ("one_expert", 5, 1, 1, F32, None, False, {}),
        ("T0", 0, 5, 2, F32, None, False, {}),
    ]
    for name, T, E, K, pdt, n, pad, kw in cases:
        rmap, pmap = routing_map(T, E, K, **kw)
        if n == "count":
            n = int(rmap.sum())
        if "int8map" in name:
            rmap = rmap.to(torch.int8)
        tokens = rand(T, 10, dtype=pdt if pdt is not None else BF16, seed=T * E + 1, grad=True)
        probs = _grad(pmap.to(pdt)) if pdt is not None else None
        out.append(
            Sample(
                name,
                (tokens, rmap, probs, n, pad),
                compile=name in ("masked_select_unrouted_f32", "pad_underfull", "static_count_T7_E5_K3"),
            )
        )
    return out


def _megatron_unpermute():
    out = []
    for s in _megatron_permute():
        tokens, rmap, probs, n, pad = s.args
        if n is not None and not pad and n != int(rmap.bool().sum()):
            continue  # Megatron's unpermute only pairs with permutes that keep every routed pair
        _, _, sorted_indices = megatron_permute_masked_select(tokens.detach(), rmap, None, n, pad and n is not None)
        permuted = rand(sorted_indices.shape[0], tokens.shape[1], dtype=tokens.dtype, seed=12, grad=True)
        out.append(
            Sample(
                s.name,
                (permuted, sorted_indices, [tokens.shape[0], tokens.shape[1]], probs, rmap, pad and n is not None),
                compile=s.compile,
            )
        )
    return out


def init_routing_cases():
    """(name, x, expert_idx, torch_npu keyword arguments)."""
    H = 12
    cases = []

    def add(name, T, E, K, x_dtype=F32, id_dtype=torch.int32, seed=0, routing=None, **kw):
        idx, _ = topk_routing(T, E, K, seed=seed, id_dtype=id_dtype, **(routing or {}))
        differentiable = kw.get("quant_mode", -1) == -1 and x_dtype != torch.int8
        x = (
            rand(T, H, dtype=x_dtype, seed=seed + 1, grad=differentiable)
            if x_dtype != torch.int8
            else torch.randint(-100, 100, (T, H), generator=_gen(seed), dtype=torch.int8)
        )
        kw.setdefault("expert_num", E)
        cases.append((name, x, idx, kw))

    add("dropless_T7_E6_K3_count", 7, 6, 3, expert_tokens_num_flag=True, expert_tokens_num_type=1)
    add(
        "range_1_4_active_num_scatter_idx_i64",
        9,
        6,
        3,
        id_dtype=torch.int64,
        seed=1,
        active_expert_range=[1, 4],
        active_num=5,
        row_idx_type=1,
        expert_tokens_num_flag=True,
        expert_tokens_num_type=0,
    )
    add(
        "range_2_5_gather_idx_bf16",
        11,
        7,
        2,
        x_dtype=BF16,
        seed=2,
        active_expert_range=[2, 5],
        expert_tokens_num_flag=True,
        expert_tokens_num_type=2,
    )
    add(
        "drop_pad_C2_skewed_keyvalue",
        13,
        5,
        2,
        seed=3,
        routing=dict(skew=True),
        drop_pad_mode=1,
        expert_capacity=2,
        expert_tokens_num_flag=True,
        expert_tokens_num_type=2,
    )
    add(
        "drop_pad_C9_underfull",
        7,
        5,
        3,
        seed=4,
        drop_pad_mode=1,
        expert_capacity=9,
        expert_tokens_num_flag=True,
        expert_tokens_num_type=1,
    )
    add("dynamic_quant_bf16", 9, 6, 3, x_dtype=BF16, seed=5, quant_mode=1)
    add("dynamic_quant_shared_smooth", 9, 6, 3, seed=6, quant_mode=1, scale=rand(1, H, seed=60).abs() + 0.5)
    add(
        "dynamic_quant_expert_smooth_range",
        9,
        6,
        3,
        seed=7,
        quant_mode=1,
        active_expert_range=[1, 5],
        scale=rand(4, H, seed=70).abs() + 0.5,
    )
    add("static_quant", 7, 5, 2, seed=8, quant_mode=0, scale=torch.tensor([3.0]), offset=torch.tensor([1.5]))
    add("no_quant_token_scale", 7, 5, 2, seed=9, scale=rand(7, seed=90, grad=True))
    add("int8_x_passthrough", 7, 5, 2, x_dtype=torch.int8, seed=10)
    add(
        "minus_one_ids_sort_to_tail",
        11,
        6,
        3,
        seed=13,
        routing=dict(unrouted=0.3),
        expert_tokens_num_flag=True,
        expert_tokens_num_type=1,
    )
    add("one_expert", 5, 1, 1, seed=11, expert_tokens_num_flag=True)
    add("T0", 0, 5, 2, seed=12, expert_tokens_num_flag=True, expert_tokens_num_type=1)
    return cases


def _init_routing():
    return [
        Sample(
            name,
            tuple(InitRoutingArgs(x, idx, **kw)),
            compile=name in ("dropless_T7_E6_K3_count", "drop_pad_C2_skewed_keyvalue"),
        )
        for name, x, idx, kw in init_routing_cases()
    ]


def _finalize():
    out = []
    H = 10

    def from_init(
        name,
        T,
        E,
        K,
        drop,
        column_major,
        seed,
        with_skip=True,
        with_bias=True,
        with_scales=True,
        dtype=F32,
        k=None,
        compile=False,
    ):
        idx, probs = topk_routing(T, E, K, seed=seed, id_dtype=torch.int32)
        x = rand(T, H, seed=seed)
        kw = dict(expert_num=E, drop_pad_mode=1 if drop else 0, expert_capacity=2 if drop else -1)
        _, row_idx, _, _ = init_routing_loop(x, idx, **kw)  # row-major (i * K + k), -1 for dropped copies
        rows = 2 * E if drop else T * K
        if column_major:
            row_idx = row_idx.view(T, K).t().reshape(-1).contiguous()
        expanded = rand(*((E, 2, H) if drop else (rows, H)), dtype=dtype, seed=seed + 1, grad=True)
        mode = (1 if drop else 0) if column_major else (3 if drop else 2)
        skip1 = rand(T, H, dtype=dtype, seed=seed + 2, grad=True) if with_skip else None
        skip2 = rand(T, H, dtype=dtype, seed=seed + 3, grad=True) if with_skip else None
        bias = rand(E, H, dtype=dtype, seed=seed + 4, grad=True) if with_bias else None
        scales = _grad(probs.to(dtype)) if with_scales else None
        experts = idx if with_bias else None
        out.append(Sample(name, (expanded, skip1, skip2, bias, scales, row_idx, experts, mode, k), compile=compile))

    from_init("dropless_row_major_all_inputs", 7, 6, 3, False, False, 0, compile=True)
    from_init("dropless_column_major_no_skip", 9, 5, 2, False, True, 1, with_skip=False)
    from_init("drop_row_major_minus1", 13, 5, 3, True, False, 2, compile=True)
    from_init("drop_column_major_bf16", 11, 5, 2, True, True, 3, dtype=BF16)
    from_init("only_rows_k_given", 7, 6, 3, False, False, 4, with_skip=False, with_bias=False, with_scales=False, k=3)
    from_init("T0", 0, 5, 2, False, False, 5)
    return out


def _gmm(cumulative: bool):
    out = []

    def groups(sizes):
        t = torch.tensor(sizes, dtype=torch.int64)
        return t.cumsum(0) if cumulative else t

    M, K, N = 13, 6, 5
    out.append(
        Sample(
            "split_m_empty_group_bias_tail",
            (
                rand(M, K, grad=True),
                rand(4, K, N, seed=1, grad=True),
                rand(4, N, seed=2, grad=True),
                groups([3, 0, 6, 2]),
                0,
            ),
            compile=True,
        )
    )
    w_t = rand(3, N, K, seed=3).transpose(1, 2).detach().requires_grad_(True)  # [G, K, N] view of [G, N, K]
    out.append(
        Sample(
            "split_m_transposed_weight_i32",
            (rand(M, K, seed=4, grad=True), w_t, None, groups([5, 1, 7]).to(torch.int32), 0),
        )
    )
    out.append(
        Sample(
            "split_m_one_group_bf16",
            (
                rand(M, K, dtype=BF16, seed=5, grad=True),
                rand(1, K, N, dtype=BF16, seed=6, grad=True),
                None,
                groups([M]),
                0,
            ),
        )
    )
    out.append(Sample("split_m_M0", (rand(0, K, grad=True), rand(2, K, N, seed=7, grad=True), None, groups([0, 0]), 0)))
    out.append(
        Sample(
            "split_k_empty_group",
            (rand(5, 9, seed=8, grad=True), rand(9, 4, seed=9, grad=True), None, groups([4, 0, 3]), 2),
            compile=True,
        )
    )
    return out


def _gmm_cumulative():
    return _gmm(True)


def _gmm_counts():
    return _gmm(False)


BUILDERS: dict[str, Callable[[], list[Sample]]] = {
    "indices_to_multihot": _multihot,
    "multihot_to_indices": _multihot_to_indices,
    "moe_token_permute_with_routing_map": _npu_permute,
    "moe_token_unpermute_with_routing_map": _npu_unpermute,
    "permute": _megatron_permute,
    "unpermute": _megatron_unpermute,
    "moe_init_routing_v2": _init_routing,
    "moe_finalize_routing": _finalize,
    "gmm": _gmm_cumulative,
    "gmm_v2": _gmm_counts,
}


def all_samples(compile_only: bool = False):
    """(op name, sample) for every op; pytest ids read `op-sample`."""
    for op, build in BUILDERS.items():
        for s in build():
            if s.compile or not compile_only:
                yield op, s


def to_float64(args: tuple) -> tuple:
    """Floating tensors to float64 (requires_grad kept), for gradcheck."""

    def convert(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.detach().to(torch.float64).requires_grad_(a.requires_grad)
        return a

    return tuple(convert(a) for a in args)


def clone_args(args: tuple) -> tuple:
    """Fresh copies of the tensor arguments (requires_grad kept), so each run gets its own leaves."""
    return tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)


def run_with_grads(fn, args: tuple):
    """`(outputs, grads)`: the outputs as a tuple, and the gradients w.r.t. every input needing one of a fixed random
    weighting of the float outputs that require grad (empty when there are none)."""
    out = fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    floats = [o for o in outs if o.is_floating_point() and o.requires_grad]
    grads = []
    if inputs and floats:
        gen = torch.Generator().manual_seed(0)
        loss = sum((o * torch.randn(o.shape, generator=gen).to(o)).sum() for o in floats)
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return outs, grads
