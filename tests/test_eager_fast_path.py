"""The eager fast path (`ops._registry.Op`): plain eager calls skip the dispatcher and give exactly what the op gives,
gradients included; calls that something must see as the op (modes, tracing, subclasses) still go through it."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_inductor import ops
from moe_inductor.ops._registry import EAGER_OPS, OPS
from samples import all_samples, clone_args, run_with_grads

ALL = list(all_samples())
IDS = [f"{op}-{s.name}" for op, s in ALL]


class _NoDispatcher:
    def __call__(self, *args):
        raise AssertionError("the fast path went through the dispatcher")


@pytest.mark.parametrize("op_name,sample", ALL, ids=IDS)
def test_fast_path_equals_the_op(op_name, sample, monkeypatch):
    expected = run_with_grads(OPS[op_name], clone_args(sample.args))
    fast = EAGER_OPS[op_name]
    monkeypatch.setattr(fast, "custom_op", _NoDispatcher())
    actual = run_with_grads(fast, clone_args(sample.args))
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)  # the same body: bit for bit


def _permute_args(grad=False):
    probs, idx = torch.randn(9, 5).softmax(-1).topk(2, dim=-1)
    routing_map, probs_map = ops.indices_to_multihot(idx, probs, 5)
    return torch.randn(9, 6, requires_grad=grad), routing_map, probs_map


def test_gradient_comes_from_the_fast_autograd_function():
    x, routing_map, probs_map = _permute_args(grad=True)
    permuted, _, _ = ops.permute(x, routing_map, probs_map, num_out_tokens=18)
    assert type(permuted.grad_fn).__name__ == "permute_eagerBackward"
    with torch.no_grad():
        assert ops.permute(x, routing_map, probs_map, num_out_tokens=18)[0].grad_fn is None


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_the_op():
    args = _permute_args()
    with _Recorder() as recorder:
        ops.permute(*args, num_out_tokens=18)
    assert "moe_inductor.permute.default" in recorder.seen


def test_subclass_and_meta_inputs_go_through_the_op(monkeypatch):
    x, routing_map, probs_map = _permute_args()
    calls = []
    op = EAGER_OPS["permute"]
    real = op.custom_op
    monkeypatch.setattr(op, "custom_op", lambda *a: calls.append(1) or real(*a))

    class Sub(torch.Tensor):
        pass

    ops.permute(x.as_subclass(Sub), routing_map, probs_map, num_out_tokens=18)
    ops.permute(x.to("meta"), routing_map.to("meta"), probs_map.to("meta"), num_out_tokens=18)
    assert len(calls) == 2
    ops.permute(x, routing_map, probs_map, num_out_tokens=18)
    assert len(calls) == 2


def test_compiled_graph_keeps_the_op():
    x, routing_map, probs_map = _permute_args()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return gm

    torch._dynamo.reset()
    torch.compile(lambda *a: ops.permute(*a, num_out_tokens=18), backend=capture, fullgraph=True)(
        x, routing_map, probs_map
    )
    assert "moe_inductor.permute" in graphs[0]


def test_profiler_shows_the_op_name():
    args = _permute_args()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.permute(*args, num_out_tokens=18)
    assert any(e.name == "moe_inductor::permute" for e in prof.events())


def test_parameters_take_the_fast_path():
    counts = torch.tensor([3, 0, 4])
    x = torch.randn(7, 5, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(3, 5, 4))
    out = ops.gmm_v2(x, w, group_list=counts)
    assert type(out.grad_fn).__name__ == "gmm_v2_eagerBackward"
