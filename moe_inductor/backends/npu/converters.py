"""torchair GE converters: our ops (kept whole on the NPU, see `WHOLE_OPS`) as Ascend IR in torchair's graph mode.

Each converter receives the op's arguments in schema order (GE tensors for tensors, Python values otherwise) and
emits the GE op that torchair itself emits for the matching torch_npu call, through torchair's public builder API
(`torchair.ge.custom_op`, `Cast`, `Const`):

    moe_token_permute_with_routing_map    -> MoeTokenPermuteWithRoutingMap
    moe_token_unpermute_with_routing_map  -> MoeTokenUnpermuteWithRoutingMap
    moe_init_routing_v2                   -> MoeInitRoutingV3 (+ Cumsum for cumulative counts)
    moe_finalize_routing                  -> MoeFinalizeRoutingV2
    gmm / gmm_v2                          -> GroupedMatmul (split_item=3, group_list_type 0 / 1)

Graph mode translates argument conventions (dtypes, defaults that moved, counts, optional inputs) like the eager
wrappers, but not what needs extra device work there. These outputs are left as the GE op writes them:
rows of `expanded_x` / `expanded_scale` past the valid count (eager: zero), `expanded_row_idx` of copies cut by
`active_num` or by the active expert range (eager: -1), the tail of the key-value count table, and a -1 row index
in dropless finalize (eager: weight 0). gmm needs groups that cover `x` exactly (eager: stretched), and split-K gmm
(the weight gradient) and static quantisation have no converter: both raise `NotImplementedError` when compiled.
"""

from __future__ import annotations

from typing import Callable

import torch

from ...reference import grouped_matmul as gmm_ref
from ...reference import init_routing as routing_ref

_registered = False


def register(torchair) -> None:
    """Register every converter with torchair (idempotent)."""
    global _registered
    if _registered:
        return
    for name, convert in ge_converters(torchair.ge).items():
        torchair.register_fx_node_ge_converter(getattr(torch.ops.moe_inductor, name).default)(convert)
    _registered = True


def _static(value, what: str) -> int:
    if not isinstance(value, int):
        raise NotImplementedError(f"moe_inductor GE converter: {what} must be static in graph mode, got {value}")
    return value


def ge_converters(ge) -> dict[str, Callable]:
    """The converters, by op name, built over a `torchair.ge`-like module (tests pass a stand-in)."""
    dt = ge.DataType

    def cast(t, dtype):
        return t if t is None or t.dtype == dtype else ge.Cast(t, dst_type=dtype)

    def fill(shape, value, dtype):
        dims = ge.Const(list(shape), dtype=dt.DT_INT64)
        return ge.custom_op("Fill", inputs={"dims": dims, "value": ge.Const(value, dtype=dtype)}, outputs=["y"])

    def routing_map_input(routing_map):
        return routing_map if routing_map is None or routing_map.dtype == dt.DT_INT8 else cast(routing_map, dt.DT_BOOL)

    def permute(tokens, routing_map, probs, num_out_tokens, drop_and_pad, meta_outputs=None):
        n = _static(tokens.symsize[0] if num_out_tokens is None else num_out_tokens, "num_out_tokens")
        permuted, permuted_probs, sorted_indices = ge.custom_op(
            "MoeTokenPermuteWithRoutingMap",
            inputs={
                "tokens": tokens,
                "routing_map": routing_map_input(routing_map),
                "probs": cast(probs, tokens.dtype),
            },
            outputs=["permute_tokens", "permute_probs", "sorted_indices"],
            attrs={"num_out_tokens": ge.attr.Int(n), "drop_and_pad": ge.attr.Bool(drop_and_pad)},
        )
        # Ops cannot return None: without probs our second output is an empty tensor.
        permuted_probs = fill([0], 0, tokens.dtype) if probs is None else cast(permuted_probs, probs.dtype)
        return permuted, permuted_probs, sorted_indices

    def unpermute(permuted, sorted_indices, restore_shape, probs, routing_map, drop_and_pad, meta_outputs=None):
        outputs = ge.custom_op(
            "MoeTokenUnpermuteWithRoutingMap",
            inputs={
                "permuted_tokens": permuted,
                "sorted_indices": cast(sorted_indices, dt.DT_INT32),
                "routing_map": routing_map_input(routing_map),
                "probs": cast(probs, permuted.dtype),
            },
            outputs=["unpermuted_tokens", "out_index", "permute_token_id", "permute_probs"],
            attrs={
                "drop_and_pad": ge.attr.Bool(drop_and_pad),
                "restore_shape": ge.attr.ListInt([_static(s, "restore_shape") for s in restore_shape]),
            },
        )
        return outputs[0]

    def init_routing(
        x,
        expert_idx,
        scale,
        offset,
        active_num,
        expert_capacity,
        expert_num,
        drop_pad_mode,
        expert_tokens_num_type,
        expert_tokens_num_flag,
        quant_mode,
        active_expert_range,
        row_idx_type,
        meta_outputs=None,
    ):
        if quant_mode == routing_ref.STATIC_QUANT:
            raise NotImplementedError("moe_init_routing_v2: static quantisation (quant_mode=0) has no GE converter")
        num_tokens, topk = (_static(s, "expert_idx shape") for s in expert_idx.symsize)
        start, end = routing_ref.expert_range(expert_num, active_expert_range)
        key_value = expert_tokens_num_type == routing_ref.KEY_VALUE
        expanded_x, row_idx, counts, expanded_scale = ge.custom_op(
            "MoeInitRoutingV3",
            inputs={
                "x": x,
                "expert_idx": cast(expert_idx, dt.DT_INT32),
                "scale": cast(scale, dt.DT_FLOAT),
                "offset": None,
            },
            outputs=["expanded_x", "expanded_row_idx", "expert_tokens_count_or_cumsum", "expanded_scale"],
            attrs={
                "active_num": ge.attr.Int(active_num if active_num > 0 else num_tokens * topk),
                "expert_capacity": ge.attr.Int(expert_capacity),
                "expert_num": ge.attr.Int(expert_num),
                "drop_pad_mode": ge.attr.Int(drop_pad_mode),
                # Always counts (or the key-value table) with the flag on: some releases accept nothing else.
                "expert_tokens_num_type": ge.attr.Int(routing_ref.KEY_VALUE if key_value else routing_ref.COUNT),
                "expert_tokens_num_flag": ge.attr.Bool(True),
                "quant_mode": ge.attr.Int(quant_mode),
                "active_expert_range": ge.attr.ListInt([start, end]),
                "row_idx_type": ge.attr.Int(row_idx_type),
            },
        )
        if not expert_tokens_num_flag:
            counts = fill([0], 0, dt.DT_INT64)
        elif expert_tokens_num_type == routing_ref.CUMSUM:
            counts = ge.custom_op(
                "Cumsum",
                inputs={"x": counts, "axis": ge.Const(0, dtype=dt.DT_INT32)},
                outputs=["y"],
                attrs={"exclusive": ge.attr.Bool(False), "reverse": ge.attr.Bool(False)},
            )
        if quant_mode == routing_ref.NO_QUANT:
            if scale is None:  # undefined on the NPU, zero in our op
                shape = routing_ref.expanded_shape(
                    num_tokens,
                    topk,
                    1,
                    active_num=active_num,
                    expert_capacity=expert_capacity,
                    expert_num=expert_num,
                    drop_pad_mode=drop_pad_mode,
                )
                expanded_scale = fill([shape[0] * shape[1] if len(shape) == 3 else shape[0]], 0.0, dt.DT_FLOAT)
            else:
                expanded_scale = cast(expanded_scale, scale.dtype)
        return expanded_x, row_idx, counts, expanded_scale

    def finalize(
        expanded, skip1, skip2, bias, scales, row_idx, expert_for_source_row, drop_pad_mode, k, meta_outputs=None
    ):
        dtype = expanded.dtype
        if scales is None:  # the GE op takes K from scales (K = 1 without them)
            topk = k if k is not None else expert_for_source_row.symsize[1]
            num_copies = _static(row_idx.symsize[0], "expanded_src_to_dst_row length")
            scales = fill([num_copies // topk, _static(topk, "k")], 1, dtype)
        if skip2 is None:  # skip2 may only come with skip1; the two are summed
            skip1, skip2 = None, skip1
        return ge.custom_op(
            "MoeFinalizeRoutingV2",
            inputs={
                "expanded_x": expanded,
                "expanded_row_idx": cast(row_idx, dt.DT_INT32),
                "x1": cast(skip1, dtype),
                "x2": cast(skip2, dtype),
                "bias": cast(bias, dtype),
                "scales": cast(scales, dtype),
                "expert_idx": cast(expert_for_source_row, dt.DT_INT32),
            },
            outputs=["y"],
            attrs={"drop_pad_mode": ge.attr.Int(drop_pad_mode)},
        )

    def make_gmm(name: str, cumulative: bool):
        def convert(x, weight, bias, group_list, group_type, meta_outputs=None):
            if group_type != gmm_ref.SPLIT_M:
                raise NotImplementedError(f"{name}: split-K (group_type=2) has no GE converter")
            single = group_list.symsize[0] == 1  # one group: its count is its cumulative end
            bias_dtype = dt.DT_FLOAT if x.dtype == dt.DT_BF16 else x.dtype
            (y,) = ge.custom_op(
                "GroupedMatmul",
                inputs={
                    "x": [x],
                    "weight": [weight],
                    "bias": [cast(bias, bias_dtype)] if bias is not None else [],
                    "scale": [],
                    "offset": [],
                    "antiquant_scale": [],
                    "antiquant_offset": [],
                    "group_list": cast(group_list, dt.DT_INT64),
                    "per_token_scale": None,
                },
                outputs=[("y", 1)],
                attrs={
                    "split_item": ge.attr.Int(3),
                    "dtype": ge.attr.Int(0),
                    "transpose_weight": ge.attr.Bool(False),
                    "transpose_x": ge.attr.Bool(False),
                    "group_type": ge.attr.Int(0),
                    "group_list_type": ge.attr.Int(0 if cumulative or single else 1),
                    "act_type": ge.attr.Int(0),
                },
            )
            return y

        return convert

    return {
        "moe_token_permute_with_routing_map": permute,
        "moe_token_unpermute_with_routing_map": unpermute,
        "moe_init_routing_v2": init_routing,
        "moe_finalize_routing": finalize,
        "gmm": make_gmm("gmm", cumulative=True),
        "gmm_v2": make_gmm("gmm_v2", cumulative=False),
    }
