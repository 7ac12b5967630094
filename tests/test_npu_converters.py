"""torchair GE converters, checked with torchair absent: a recording stand-in of `torchair.ge` shows which GE ops
each converter emits, with which inputs (and casts) and attributes."""

from __future__ import annotations

import pytest

import moe_inductor  # noqa: F401  (registers the ops)
from moe_inductor.backends.npu import converters
from npu_standin import torchair_standin as tair
from npu_standin.torchair_standin import Attr, DataType, Tensor

DT = DataType


@pytest.fixture
def convert():
    tair.reset()
    return converters.ge_converters(tair.ge)


def _attrs(node):
    return {k: v.value for k, v in node.attrs.items()}


def _only(op_type):
    (node,) = tair.ops(op_type)
    return node


def _cast_of(t: Tensor):
    assert t.node is not None and t.node.op_type == "Cast"
    return t.node.attrs["dst_type"], t.node.inputs["x"]


def test_every_whole_op_has_a_converter(convert):
    from moe_inductor.backends import npu

    assert set(convert) == set(npu.WHOLE_OPS)


def test_attributes_are_typed(convert):
    tokens, rmap = Tensor(DT.DT_BF16, [6, 8]), Tensor(DT.DT_BOOL, [6, 4])
    convert["moe_token_permute_with_routing_map"](tokens, rmap, None, 12, False)
    node = _only("MoeTokenPermuteWithRoutingMap")
    assert node.attrs == {"num_out_tokens": Attr("Int", 12), "drop_and_pad": Attr("Bool", False)}


def test_permute(convert):
    tokens, rmap, probs = Tensor(DT.DT_BF16, [6, 8]), Tensor(DT.DT_UINT8, [6, 4]), Tensor(DT.DT_FLOAT, [6, 4])
    permuted, permuted_probs, sorted_indices = convert["moe_token_permute_with_routing_map"](
        tokens, rmap, probs, None, True
    )
    node = _only("MoeTokenPermuteWithRoutingMap")
    assert node.outputs == ["permute_tokens", "permute_probs", "sorted_indices"]
    assert _attrs(node) == {"num_out_tokens": 6, "drop_and_pad": True}  # None means T, passed explicitly
    assert node.inputs["tokens"] is tokens
    assert _cast_of(node.inputs["routing_map"]) == (DT.DT_BOOL, rmap)  # the kernel takes bool or int8
    assert _cast_of(node.inputs["probs"]) == (DT.DT_BF16, probs)  # one dtype per call
    assert _cast_of(permuted_probs)[0] == DT.DT_FLOAT and sorted_indices.dtype == DT.DT_INT32


def test_permute_without_probs_returns_an_empty_tensor(convert):
    tokens, rmap = Tensor(DT.DT_FLOAT, [6, 8]), Tensor(DT.DT_INT8, [6, 4])
    _, permuted_probs, _ = convert["moe_token_permute_with_routing_map"](tokens, rmap, None, 12, False)
    node = _only("MoeTokenPermuteWithRoutingMap")
    assert node.inputs["routing_map"] is rmap and node.inputs["probs"] is None
    assert permuted_probs.node.op_type == "Fill" and permuted_probs.dtype == DT.DT_FLOAT
    assert permuted_probs.node.inputs["dims"].node.attrs["value"] == [0]


def test_unpermute(convert):
    permuted, idx = Tensor(DT.DT_FLOAT16, [12, 8]), Tensor(DT.DT_INT64, [12])
    probs, rmap = Tensor(DT.DT_FLOAT, [6, 4]), Tensor(DT.DT_BOOL, [6, 4])
    out = convert["moe_token_unpermute_with_routing_map"](permuted, idx, [6, 8], probs, rmap, False)
    node = _only("MoeTokenUnpermuteWithRoutingMap")
    assert out.node is node and out.index == 0
    assert node.outputs == ["unpermuted_tokens", "out_index", "permute_token_id", "permute_probs"]
    assert _attrs(node) == {"drop_and_pad": False, "restore_shape": [6, 8]}
    assert _cast_of(node.inputs["sorted_indices"]) == (DT.DT_INT32, idx)
    assert _cast_of(node.inputs["probs"]) == (DT.DT_FLOAT16, probs)
    assert node.inputs["routing_map"] is rmap


def _init_args(**kw):
    args = dict(
        x=Tensor(DT.DT_BF16, [5, 16]),
        expert_idx=Tensor(DT.DT_INT64, [5, 3]),
        scale=None,
        offset=None,
        active_num=-1,
        expert_capacity=-1,
        expert_num=8,
        drop_pad_mode=0,
        expert_tokens_num_type=0,
        expert_tokens_num_flag=False,
        quant_mode=-1,
        active_expert_range=[],
        row_idx_type=0,
    )
    args.update(kw)
    return list(args.values())


def test_init_routing(convert):
    args = _init_args(expert_tokens_num_flag=True, active_expert_range=[2, 6], row_idx_type=1)
    expanded_x, row_idx, counts, expanded_scale = convert["moe_init_routing_v2"](*args)
    node = _only("MoeInitRoutingV3")
    assert node.outputs == ["expanded_x", "expanded_row_idx", "expert_tokens_count_or_cumsum", "expanded_scale"]
    assert _attrs(node) == {
        "active_num": 15,  # ours: -1 = all rows; passed as N*K, which every release accepts
        "expert_capacity": -1,
        "expert_num": 8,
        "drop_pad_mode": 0,
        "expert_tokens_num_type": 1,  # counts, always with the flag on ...
        "expert_tokens_num_flag": True,
        "quant_mode": -1,  # ... and quant_mode always explicit
        "active_expert_range": [2, 6],
        "row_idx_type": 1,
    }
    assert _cast_of(node.inputs["expert_idx"]) == (DT.DT_INT32, args[1])
    assert node.inputs["scale"] is None and node.inputs["offset"] is None
    cumsum = _only("Cumsum")  # cumulative counts were asked for
    assert (
        counts.node is cumsum
        and cumsum.inputs["x"].node is node
        and _attrs(cumsum) == dict(exclusive=False, reverse=False)
    )
    assert expanded_scale.node.op_type == "Fill"  # undefined on the NPU without scale; zero in our op
    assert expanded_scale.node.inputs["dims"].node.attrs["value"] == [15]


def test_init_routing_quant_key_value_drop_pad(convert):
    scale = Tensor(DT.DT_FLOAT, [8, 16])
    args = _init_args(
        scale=scale,
        quant_mode=1,
        drop_pad_mode=1,
        expert_capacity=4,
        expert_tokens_num_flag=True,
        expert_tokens_num_type=2,
        active_num=7,
    )
    expanded_x, _, counts, expanded_scale = convert["moe_init_routing_v2"](*args)
    node = _only("MoeInitRoutingV3")
    attrs = _attrs(node)
    assert attrs["quant_mode"] == 1 and attrs["expert_tokens_num_type"] == 2 and attrs["active_num"] == 7
    assert attrs["drop_pad_mode"] == 1 and attrs["expert_capacity"] == 4
    assert node.inputs["scale"] is scale
    assert counts.node is node and expanded_scale.node is node and not tair.ops("Cumsum")


def test_init_routing_without_counts_and_static_quant(convert):
    _, _, counts, _ = convert["moe_init_routing_v2"](*_init_args())
    assert counts.node.op_type == "Fill" and counts.dtype == DT.DT_INT64
    with pytest.raises(NotImplementedError, match="static"):
        convert["moe_init_routing_v2"](*_init_args(quant_mode=0))


def test_finalize(convert):
    expanded, skip1 = Tensor(DT.DT_BF16, [15, 16]), Tensor(DT.DT_FLOAT, [5, 16])
    bias, scales = Tensor(DT.DT_BF16, [8, 16]), Tensor(DT.DT_FLOAT, [5, 3])
    row_idx, experts = Tensor(DT.DT_INT64, [15]), Tensor(DT.DT_INT32, [5, 3])
    out = convert["moe_finalize_routing"](expanded, skip1, None, bias, scales, row_idx, experts, 3, None)
    node = _only("MoeFinalizeRoutingV2")
    assert out.node is node and node.outputs == ["y"] and _attrs(node) == {"drop_pad_mode": 3}
    assert node.inputs["x1"] is None and _cast_of(node.inputs["x2"]) == (DT.DT_BF16, skip1)  # skip2 needs skip1
    assert _cast_of(node.inputs["expanded_row_idx"]) == (DT.DT_INT32, row_idx)
    assert _cast_of(node.inputs["scales"]) == (DT.DT_BF16, scales)
    assert node.inputs["bias"] is bias and node.inputs["expert_idx"] is experts


def test_finalize_without_scales_passes_ones(convert):
    expanded, row_idx = Tensor(DT.DT_FLOAT, [15, 16]), Tensor(DT.DT_INT32, [15])
    convert["moe_finalize_routing"](expanded, None, None, None, None, row_idx, None, 0, 3)
    scales = _only("MoeFinalizeRoutingV2").inputs["scales"]  # the GE op reads K from scales (K = 1 without)
    assert scales.node.op_type == "Fill" and scales.node.inputs["dims"].node.attrs["value"] == [5, 3]
    assert scales.node.inputs["value"].node.attrs["value"] == 1


@pytest.mark.parametrize("name,groups,list_type", [("gmm", 4, 0), ("gmm_v2", 4, 1), ("gmm_v2", 1, 0)])
def test_gmm(convert, name, groups, list_type):
    x, weight = Tensor(DT.DT_BF16, [32, 16]), Tensor(DT.DT_BF16, [groups, 16, 8])
    bias, group_list = Tensor(DT.DT_BF16, [groups, 8]), Tensor(DT.DT_INT32, [groups])
    y = convert[name](x, weight, bias, group_list, 0)
    node = _only("GroupedMatmul")
    assert y.node is node and node.outputs == [("y", 1)]
    assert node.inputs["x"] == [x] and node.inputs["weight"] == [weight]
    ((bias_dtype, bias_in),) = [_cast_of(b) for b in node.inputs["bias"]]
    assert bias_dtype == DT.DT_FLOAT and bias_in is bias  # bf16 x takes a float32 bias
    assert _cast_of(node.inputs["group_list"]) == (DT.DT_INT64, group_list)
    attrs = _attrs(node)
    assert attrs["split_item"] == 3 and attrs["group_type"] == 0 and attrs["group_list_type"] == list_type
    assert node.inputs["scale"] == [] and node.inputs["per_token_scale"] is None


def test_gmm_split_k_has_no_converter(convert):
    with pytest.raises(NotImplementedError, match="split-K"):
        convert["gmm"](Tensor(DT.DT_BF16, [16, 32]), Tensor(DT.DT_BF16, [32, 8]), None, Tensor(DT.DT_INT64, [4]), 2)


def test_register_is_idempotent(monkeypatch):
    import torch

    tair.reset()
    monkeypatch.setattr(converters, "_registered", False)
    converters.register(tair)
    first = dict(tair.CONVERTERS)
    tair.CONVERTERS.clear()
    converters.register(tair)
    assert not tair.CONVERTERS and torch.ops.moe_inductor.gmm.default in first
