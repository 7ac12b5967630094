"""RouterReplay under torch.compile: no graph break, no recompile when targets change, same results as eager.

Recompile counting uses the cheap `eager` / `aot_eager` backends; the Inductor backends (`inductor` and ours,
`moe_inductor`) check numerics and compile counts over a few steps.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.checkpoint import checkpoint

from moe_inductor import RouterReplay, RouterReplayAction

FWD, BWD, RECORD = RouterReplayAction.REPLAY_FORWARD, RouterReplayAction.REPLAY_BACKWARD, RouterReplayAction.RECORD
TOKENS, HIDDEN, EXPERTS, TOPK, LAYERS = 6, 4, 8, 2, 2
INDUCTORS = ["inductor", "moe_inductor"]


@pytest.fixture(autouse=True)
def fresh_routers():
    """The router list and actions are class-level state; compiled code is per test too."""
    RouterReplay.clear_global_router_replay_instances()
    torch._dynamo.reset()
    yield
    RouterReplay.clear_global_router_replay_action()
    RouterReplay.clear_global_indices()
    RouterReplay.clear_global_router_replay_instances()
    torch._dynamo.reset()


class MoELayer(torch.nn.Module):
    """Router + experts; output and gradients depend on which experts are chosen."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.router = torch.nn.Parameter(torch.randn(HIDDEN, EXPERTS, generator=g))
        self.experts = torch.nn.Parameter(torch.randn(EXPERTS, HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5)
        self.replay = RouterReplay()

    def forward(self, x):
        probs, indices = self.replay.get_replay_topk(torch.softmax(x @ self.router, dim=-1), TOPK)
        expert_out = torch.einsum("th,tkhg->tkg", x, self.experts[indices])
        return x + (probs.unsqueeze(-1) * expert_out).sum(1), probs, indices


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(MoELayer(seed) for seed in range(LAYERS))

    def forward(self, x):
        probs, indices = [], []
        for layer in self.layers:
            x, p, i = layer(x)
            probs.append(p)
            indices.append(i)
        return x, probs, indices


def inputs(step, num_tokens=TOKENS):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(num_tokens, HIDDEN, generator=g, requires_grad=True)
    targets = [torch.stack([torch.randperm(EXPERTS, generator=g)[:TOPK] for _ in range(num_tokens)])]
    targets += [torch.randint(0, EXPERTS, (num_tokens, TOPK), generator=g) for _ in range(LAYERS - 1)]
    return x, targets


def run_step(model, fn, action, x, targets):
    """One training step of `fn` (model or its compiled form) under `action`: outputs, grads, recorded routes."""
    RouterReplay.clear_global_indices()
    if action is None:
        RouterReplay.clear_global_router_replay_action()
    else:
        RouterReplay.set_global_router_replay_action(action)
    RouterReplay.set_replay_data(targets)
    model.zero_grad()
    x.grad = None
    out, probs, indices = fn(x)
    out.square().sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    return out, probs, indices, grads, RouterReplay.get_recorded_data()


def check_step(model, compiled, action, step, num_tokens=TOKENS, **tol):
    """Run a step compiled and eager; compare everything, and check the routes replayed are the targets."""
    x, targets = inputs(step, num_tokens)
    got = run_step(model, compiled, action, x, targets)
    want = run_step(model, model, action, x, targets)
    torch.testing.assert_close(got, want, **tol)
    _, probs, indices, _, recorded = got
    if action in (FWD, BWD):
        assert all(torch.equal(i, t) for i, t in zip(indices, targets, strict=True))
    if action is RECORD:
        assert all(torch.equal(i, r) for i, r in zip(indices, recorded, strict=True))
    if action is BWD:
        assert all(layer.replay.replay_backward_list == [] for layer in model.layers)


# ----------------------------------------------------------------------------------------- graph breaks, recompiles


@pytest.mark.parametrize("action", [None, RECORD, FWD, BWD], ids=str)
def test_no_graph_break_in_any_action(action):
    model = Model()
    x, targets = inputs(0)
    RouterReplay.set_replay_data(targets)
    if action is not None:
        RouterReplay.set_global_router_replay_action(action)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_fresh_targets_every_step_compile_once_per_action(backend):
    """5 steps per action, fresh inputs and targets each time; REPLAY_FORWARD/BACKWARD share one graph."""
    model = Model()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    step = 0
    for action, frames in ((None, 1), (RECORD, 2), (FWD, 3), (BWD, 3), (RECORD, 3), (FWD, 3), (None, 3)):
        for _ in range(5):
            check_step(model, compiled, action, step)
            step += 1
        assert counter.frame_count == frames, f"after {action}"


def test_every_layer_compiled_separately_shares_one_graph_per_action():
    """Compiling each block (one router each) must not guard on which router it holds."""
    model = Model()
    counter = CompileCounterWithBackend("aot_eager")
    for layer in model.layers:
        layer.compile(backend=counter, fullgraph=True)
    for step, action in enumerate((RECORD, RECORD, FWD, BWD, FWD, BWD)):
        # (x requires grad, as every later layer's input does: requires_grad is a legitimate guard.)
        x, targets = inputs(step)
        _, _, indices, _, recorded = run_step(model, model, action, x, targets)
        want = recorded if action is RECORD else targets
        assert all(torch.equal(i, w) for i, w in zip(indices, want, strict=True))
    assert counter.frame_count == 2


def test_token_count_changes_are_one_dynamic_graph():
    model = Model()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    for step, num_tokens in enumerate((5, 9, 3, 12)):
        check_step(model, compiled, BWD, step, num_tokens)
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", INDUCTORS)
def test_inductor_matches_eager_with_one_compile_per_action(backend):
    model = Model()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for phase, action in enumerate((RECORD, FWD, BWD)):
        for step in range(5):
            check_step(model, compiled, action, 10 * phase + step, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 2  # RECORD, and the replay graph both replay actions share


# ------------------------------------------------------------------------------------------ activation checkpointing


def checkpointed_grads(model, fn, batches, targets):
    """Megatron's schedule: all forwards (REPLAY_FORWARD, queueing targets), then the backwards in the same order."""
    RouterReplay.clear_global_indices()
    model.zero_grad()
    RouterReplay.set_global_router_replay_action(FWD)
    outputs = []
    for x, t in zip(batches, targets, strict=True):
        RouterReplay.set_replay_data(t)
        outputs.append(fn(x))
    RouterReplay.set_global_router_replay_action(BWD)
    for out in outputs:
        out.square().sum().backward()
    assert all(layer.replay.replay_backward_list == [] for layer in model.layers)
    return [p.grad.clone() for p in model.parameters()]


def reference_grads(model, batches, targets):
    """No checkpointing: each micro-batch simply replays its own targets."""
    RouterReplay.clear_global_indices()
    model.zero_grad()
    RouterReplay.set_global_router_replay_action(FWD)
    for x, t in zip(batches, targets, strict=True):
        RouterReplay.set_replay_data(t)
        model(x)[0].square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def micro_batches(n=3):
    pairs = [inputs(100 + m) for m in range(n)]
    return [x for x, _ in pairs], [t for _, t in pairs]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_checkpointed_compiled_model_replays_micro_batches_in_fifo_order(backend):
    """The recompute runs the compiled model again under REPLAY_BACKWARD; it must reuse the forward's graph.

    (Separate graphs per replay action fail here with Inductor: the partitioner saves a different number of
    tensors in each, and non-reentrant checkpointing rejects the recompute.)
    """
    model = Model()
    batches, targets = micro_batches()
    expected = reference_grads(model, batches, targets)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for _ in range(2):
        got = checkpointed_grads(model, lambda x: checkpoint(compiled, x, use_reentrant=False)[0], batches, targets)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_checkpoint_inside_the_compiled_region_pops_in_the_compiled_backward():
    """Dynamo traces the checkpoint; the compiled backward re-runs the target op, which pops under REPLAY_BACKWARD."""
    model = Model()
    batches, targets = micro_batches()
    expected = reference_grads(model, batches, targets)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x: checkpoint(model, x, use_reentrant=False)[0], backend=counter, fullgraph=True)
    got = checkpointed_grads(model, compiled, batches, targets)
    torch.testing.assert_close(got, expected)
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------- static buffer, side effects


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_static_buffer_records_in_place_under_compile(backend):
    model = Model()
    buffer = torch.full((10, LAYERS, TOPK), -1, dtype=torch.long)
    RouterReplay.set_global_static_buffers(buffer)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for step in range(3):
        buffer.fill_(-1)
        _, _, indices, _, recorded = run_step(model, compiled, RECORD, *inputs(step))
        for layer, (i, r) in enumerate(zip(indices, recorded, strict=True)):
            assert torch.equal(buffer[:TOKENS, layer], i)
            assert r.data_ptr() == buffer[0, layer].data_ptr() and torch.equal(r, i)
        assert (buffer[TOKENS:] == -1).all()
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_replay_backward_pops_even_when_the_result_is_unused(backend):
    """The target op is side-effectful: no dead-code elimination may drop a pop."""
    router = RouterReplay()

    def fn(scores):
        router.get_replay_topk(scores, TOPK)
        return scores * 2

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    for t in inputs(0)[1] + inputs(1)[1]:
        router.set_target_indices(t)
    router.set_router_replay_action(BWD)
    scores = torch.rand(TOKENS, EXPERTS)
    for left in (3, 2, 1, 0):
        compiled(scores)
        assert len(router.replay_backward_list) == left
    with pytest.raises(RuntimeError, match="REPLAY_BACKWARD: the FIFO of targets is empty"):
        compiled(scores)


def test_errors_surface_from_compiled_code():
    model = Model()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, targets = inputs(0)
    RouterReplay.set_global_router_replay_action(FWD)
    with pytest.raises(RuntimeError, match="REPLAY_FORWARD: no target indices"):
        compiled(x)
    RouterReplay.set_replay_data([t[:, :1] for t in targets])
    with pytest.raises(ValueError, match=r"must have shape \[T, topk\] = \[6, 2\], got \[6, 1\]"):
        compiled(x)


# ------------------------------------------------------------------------------------------------------ CUDA only


def _route(layer, x):
    """The routes `layer` picks for `x` without any replay state (plain top-k)."""
    return torch.topk(torch.softmax(x @ layer.router, dim=-1), TOPK, dim=1).indices


@pytest.mark.gpu
def test_static_buffer_records_under_cuda_graph_replays():
    """Megatron's CUDA-graph case: RECORD is captured once, and every replay writes its routes into the buffer."""
    layer = MoELayer(0).cuda()
    buffer = torch.full((16, 1, TOPK), -1, dtype=torch.long, device="cuda")
    RouterReplay.set_global_static_buffers(buffer)
    RouterReplay.set_global_router_replay_action(RECORD)
    static_x = torch.randn(TOKENS, HIDDEN, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(side):  # warm up outside the capture, as CUDA graphs require
            layer(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layer(static_x)
    for step in range(3):
        x = inputs(step)[0].detach().cuda()
        static_x.copy_(x)
        buffer.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(buffer[:TOKENS, 0], _route(layer, x))
        assert (buffer[TOKENS:] == -1).all()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_cuda_replay_of_cpu_targets_under_inductor(mode):
    """Targets from the host reach the device in the graph; Inductor's CUDA graphs must not freeze a target."""
    model = Model().cuda()
    counter = CompileCounterWithBackend("inductor") if mode is None else None
    backend = {"backend": counter} if mode is None else {"mode": mode}
    compiled = torch.compile(model, fullgraph=True, **backend)
    for action in (FWD, BWD):
        RouterReplay.set_global_router_replay_action(action)
        for step in range(4):
            x, targets = inputs(step)
            RouterReplay.clear_global_indices()
            RouterReplay.set_replay_data(targets)
            out, probs, indices = compiled(x.detach().cuda())
            torch.cuda.synchronize()
            assert all(torch.equal(i.cpu(), t) for i, t in zip(indices, targets, strict=True))
    if counter is not None:
        assert counter.frame_count == 1


@pytest.mark.gpu
def test_cuda_static_buffer_record_under_reduce_overhead():
    model = Model().cuda()
    buffer = torch.full((TOKENS, LAYERS, TOPK), -1, dtype=torch.long, device="cuda")
    RouterReplay.set_global_static_buffers(buffer)
    RouterReplay.set_global_router_replay_action(RECORD)
    compiled = torch.compile(model, mode="reduce-overhead")
    for step in range(4):
        x = inputs(step)[0].detach().cuda()
        buffer.fill_(-1)
        with torch.no_grad():
            _, _, indices = compiled(x)
        torch.cuda.synchronize()
        for layer in range(LAYERS):
            assert torch.equal(buffer[:, layer], indices[layer])
        assert torch.equal(buffer[:, 0], _route(model.layers[0], x))
