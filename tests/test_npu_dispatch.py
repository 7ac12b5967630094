"""Ascend NPU dispatch, checked without an NPU against a stand-in of torch_npu's documented kernels.

The `npu` fixture installs the stand-in as `torch_npu` and routes CPU tensors to `moe_inductor.backends.npu` (what
`install()` does for "npu" tensors), so every call runs the whole op (validation, autograd, fake kernel) with the
NPU wrappers underneath, and results can be compared with the same op on the CPU reference.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.library import opcheck

import moe_inductor  # noqa: F401  (registers the ops)
from moe_inductor import ops
from moe_inductor.backends import npu as npu_backend
from moe_inductor.ops import OPS, _registry
from moe_inductor.reference import grouped_matmul as gmm_ref
from npu_standin import torch_npu_standin as standin
from npu_standin import torchair_standin
from samples import BUILDERS, all_samples, clone_args, rand, routing_map, topk_routing

ROUTED = list(all_samples())
ROUTED_IDS = [f"{op}-{s.name}" for op, s in ROUTED]
NATIVE_FAMILIES = ("permute", "unpermute", "moe_token", "moe_init", "moe_finalize", "gmm")


@pytest.fixture
def npu(monkeypatch):
    """torch_npu stand-in installed; CPU tensors take the NPU path while the fixture is active."""
    monkeypatch.setitem(sys.modules, "torch_npu", standin)
    standin.CALLS.clear()

    class Route:
        def __enter__(self):
            _registry.DEVICE_KERNELS["cpu"] = npu_backend

        def __exit__(self, *exc):
            _registry.DEVICE_KERNELS.pop("cpu", None)

    monkeypatch.setattr(_registry, "DEVICE_KERNELS", {})
    return Route()


def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _assert_same(actual, expected, what=""):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if actual.is_floating_point():
        tol = dict(atol=2e-2, rtol=2e-2) if actual.dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(actual, expected, **tol, msg=what)
    else:
        assert torch.equal(actual, expected), what


@pytest.mark.parametrize("op_name,sample", ROUTED, ids=ROUTED_IDS)
def test_npu_path_equals_reference_forward_and_backward(npu, op_name, sample):
    op = OPS[op_name]
    ref_args, npu_args = clone_args(sample.args), clone_args(sample.args)
    expected = _tuple(op(*ref_args))
    with npu:
        actual = _tuple(op(*npu_args))
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        _assert_same(a.detach(), e.detach(), f"output {i}")
    split_k = op_name.startswith("gmm") and sample.args[4] == gmm_ref.SPLIT_K  # runs the reference on the NPU
    if op_name.startswith(NATIVE_FAMILIES) and sample.args[0].shape[0] > 0 and not split_k:
        assert standin.CALLS, "the native kernel was not called"

    # Our autograd formulas, with the NPU kernels underneath, give the reference's gradients.
    outs = [(a, e) for a, e in zip(actual, expected, strict=True) if a.requires_grad and a.is_floating_point()]
    if not outs:
        return
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(e.shape, generator=gen).to(e.dtype) for _, e in outs]
    torch.autograd.backward([e for _, e in outs], grads)
    with npu:
        torch.autograd.backward([a for a, _ in outs], grads)
    for a, e in zip(npu_args, ref_args, strict=True):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            assert (a.grad is None) == (e.grad is None)
            if a.grad is not None:
                _assert_same(a.grad, e.grad, "gradient")


@pytest.mark.parametrize("op_name,sample", ROUTED, ids=ROUTED_IDS)
def test_fake_kernels_match_npu_outputs(npu, op_name, sample):
    """What npugraph_ex relies on: our fake kernels give the shapes the NPU path really returns."""
    with npu:
        opcheck(
            OPS[op_name],
            clone_args(sample.args),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )


@pytest.mark.parametrize("cumulative", [True, False], ids=["gmm", "gmm_v2"])
def test_npu_gmm_equals_reference(npu, cumulative):
    for s in BUILDERS["gmm" if cumulative else "gmm_v2"]():
        x, weight, bias, group_list, group_type = (a.detach() if isinstance(a, torch.Tensor) else a for a in s.args)
        standin.CALLS.clear()
        actual = npu_backend.grouped_matmul.gmm(x, weight, bias, group_list, group_type, cumulative)
        expected = gmm_ref.gmm(x, weight, bias, group_list, group_type, cumulative)
        _assert_same(actual, expected, s.name)
        native = group_type == gmm_ref.SPLIT_M and x.shape[0] > 0
        assert bool(standin.CALLS) == native, s.name
        if native:
            (_, kw), *_ = standin.CALLS
            single = group_list.shape[0] == 1
            assert kw == dict(split_item=3, group_type=0, group_list_type=0 if cumulative or single else 1)


def test_gmm_rows_past_the_last_group_are_zero(npu):
    x, weight = rand(10, 4), rand(2, 4, 3, seed=1)
    counts = torch.tensor([3, 4])
    y = npu_backend.grouped_matmul.gmm(x, weight, None, counts, 0, cumulative=False)
    assert torch.equal(y[7:], torch.zeros(3, 3))
    torch.testing.assert_close(y[:3], x[:3] @ weight[0])


# ---------------------------------------------------------------------------------------------------------------------
# Argument translation, case by case
# ---------------------------------------------------------------------------------------------------------------------


def _last(kind):
    return [kw for name, kw in standin.CALLS if name == kind][-1]


def test_permute_passes_t_for_none_and_a_bool_map(npu):
    rmap, pmap = routing_map(6, 4, 1)
    tokens = rand(6, 5)
    with npu:
        ops.moe_token_permute_with_routing_map(tokens, rmap.to(torch.uint8), probs=pmap)
    assert _last("permute")["num_out_tokens"] == 6


def test_permute_keeps_probs_precision_when_dtypes_differ(npu):
    rmap, pmap = routing_map(7, 5, 2)
    tokens = rand(7, 6, dtype=torch.bfloat16)
    expected = ops.moe_token_permute_with_routing_map(tokens, rmap, probs=pmap, num_out_tokens=14)
    with npu:
        actual = ops.moe_token_permute_with_routing_map(tokens, rmap, probs=pmap, num_out_tokens=14)
    assert _last("permute")["probs"] is None  # the kernel would round fp32 probs to bf16
    assert torch.equal(actual[1], expected[1]) and actual[1].dtype == torch.float32


def test_megatron_dropless_permute_uses_init_routing_with_forward_map(npu):
    rmap, pmap = routing_map(9, 5, 2, unrouted=0.3, seed=3)
    tokens = rand(9, 4)
    expected = ops.permute(tokens, rmap, pmap)
    with npu:
        actual = ops.permute(tokens, rmap, pmap)
    kw = _last("init_routing")
    assert kw["expert_num"] == 10 and kw["active_expert_range"] == [0, 10] and kw["row_idx_type"] == 0
    assert kw["quant_mode"] == -1 and kw["active_num"] == int(rmap.sum())
    assert actual[2].dtype == torch.int64  # Megatron's forward map, not the NPU permute's inverse one
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)


def test_init_routing_always_passes_quant_mode_and_counts(npu):
    idx, _ = topk_routing(6, 4, 2, id_dtype=torch.int64)
    x = rand(6, 8)
    with npu:
        ops.moe_init_routing_v2(x, idx, expert_num=4)  # our defaults: no counts, quant_mode -1
    kw = _last("init_routing")
    assert kw["quant_mode"] == -1 and kw["expert_tokens_num_flag"] and kw["expert_tokens_num_type"] == 1
    assert kw["active_num"] == 12 and kw["active_expert_range"] == [0, 4]


def test_init_routing_static_quant_is_done_after_unquantised_routing(npu):
    idx, _ = topk_routing(7, 5, 2, id_dtype=torch.int32)
    x, scale, offset = rand(7, 6) * 3, torch.tensor([2.0]), torch.tensor([0.5])
    expected = ops.moe_init_routing_v2(x, idx, expert_num=5, quant_mode=0, scale=scale, offset=offset)
    with npu:
        actual = ops.moe_init_routing_v2(x, idx, expert_num=5, quant_mode=0, scale=scale, offset=offset)
    assert _last("init_routing")["quant_mode"] == -1
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)


def test_init_routing_zeroes_rows_the_npu_leaves_undefined(npu):
    idx, _ = topk_routing(8, 6, 3, seed=5, id_dtype=torch.int32)
    x = rand(8, 5)
    with npu:
        expanded, row_idx, counts, _ = ops.moe_init_routing_v2(
            x, idx, expert_num=6, active_expert_range=[2, 4], expert_tokens_num_flag=True, expert_tokens_num_type=1
        )
    avail = int(counts.sum())
    assert avail < 24 and torch.equal(expanded[avail:], torch.zeros(24 - avail, 5))  # stand-in: NaN there
    assert int((row_idx >= 0).sum()) == avail


def test_init_routing_v2_kernel_path_quirk(npu):
    """expert_num 128, range [0, 128), H 2048: the kernel returns another tensor in place of expanded_scale."""
    idx, _ = topk_routing(3, 128, 2, seed=6, id_dtype=torch.int32)
    x, scale = rand(3, 2048), rand(3, seed=7)
    kw = dict(expert_num=128, scale=scale, row_idx_type=1, expert_tokens_num_flag=True, expert_tokens_num_type=0)
    expected = ops.moe_init_routing_v2(x, idx, **kw)
    with npu:
        actual = ops.moe_init_routing_v2(x, idx, **kw)
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)


def test_finalize_translates_skips_scales_and_dropped_rows(npu):
    num_tokens, topk, hidden = 5, 2, 4
    expanded = rand(num_tokens * topk, hidden)
    row_idx = torch.randperm(num_tokens * topk, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    row_idx[3] = -1  # a dropped copy, outside the kernel's dropless range
    skip1 = rand(num_tokens, hidden, seed=1)
    expected = ops.moe_finalize_routing(expanded, skip1, None, None, None, row_idx, None, 2, topk)
    with npu:
        actual = ops.moe_finalize_routing(expanded, skip1, None, None, None, row_idx, None, 2, topk)
    kw = _last("finalize")
    assert kw["skip1"] is None and kw["skip2"] is not None and kw["scales"].shape == (num_tokens, topk)
    torch.testing.assert_close(actual, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Activation and torch.compile
# ---------------------------------------------------------------------------------------------------------------------


def test_install_is_a_no_op_without_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # `import torch_npu` raises ImportError
    monkeypatch.setattr(_registry, "DEVICE_KERNELS", {})
    assert npu_backend.install() is False
    assert _registry.DEVICE_KERNELS == {}


def test_install_routes_npu_tensors_and_registers_converters(monkeypatch):
    from moe_inductor.backends.npu import converters

    monkeypatch.setitem(sys.modules, "torch_npu", standin)
    monkeypatch.setitem(sys.modules, "torchair", torchair_standin)
    monkeypatch.setattr(_registry, "DEVICE_KERNELS", {})
    monkeypatch.setattr(converters, "_registered", False)
    torchair_standin.reset()
    assert npu_backend.install() and npu_backend.install()  # idempotent
    on_npu = types.SimpleNamespace(device=types.SimpleNamespace(type="npu"))  # backend() reads only the device type
    assert _registry.backend(on_npu) is npu_backend
    assert _registry.backend(torch.zeros(1)).__name__ == "moe_inductor.reference"
    expected = {getattr(torch.ops.moe_inductor, name).default for name in npu_backend.WHOLE_OPS}
    assert set(torchair_standin.CONVERTERS) == expected


def test_install_without_torchair_registers_no_converters(monkeypatch):
    from moe_inductor.backends.npu import converters

    monkeypatch.setitem(sys.modules, "torch_npu", standin)
    monkeypatch.setitem(sys.modules, "torchair", None)
    monkeypatch.setattr(_registry, "DEVICE_KERNELS", {})
    monkeypatch.setattr(converters, "_registered", False)
    assert npu_backend.install()
    assert "npu" in _registry.DEVICE_KERNELS and not converters._registered


def test_compile_keeps_npu_ops_whole_and_decomposes_the_rest(npu):
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    def layer(x, idx, probs):
        routing, probs_map = ops.indices_to_multihot(idx, probs, 6)
        expanded, row_idx, _, _ = ops.moe_init_routing_v2(x, idx.to(torch.int32), expert_num=6)
        out = ops.moe_finalize_routing(expanded * 2, None, None, None, probs, row_idx, None, 2)
        return out, probs_map

    idx, probs = topk_routing(5, 6, 2)
    x = rand(5, 4)
    torch._dynamo.reset()
    with npu:
        compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=capture), fullgraph=True)
        actual = compiled(x, idx, probs)
    expected = layer(x, idx, probs)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert "moe_inductor.moe_init_routing_v2.default" in targets
    assert "moe_inductor.moe_finalize_routing.default" in targets
    assert "moe_inductor.indices_to_multihot.default" not in targets  # no native kernel: decomposed as usual
