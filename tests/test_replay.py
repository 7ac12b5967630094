"""RouterReplay in eager mode: the Megatron API and semantics (SPEC.md section 6), errors, activation checkpointing."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moe_inductor import RouterReplay, RouterReplayAction
from moe_inductor.replay import compute_topk, group_limited_topk

FWD, BWD, RECORD = RouterReplayAction.REPLAY_FORWARD, RouterReplayAction.REPLAY_BACKWARD, RouterReplayAction.RECORD


@pytest.fixture(autouse=True)
def fresh_routers():
    """The router list and actions are class-level state: every test starts and ends with none."""
    RouterReplay.clear_global_router_replay_instances()
    yield
    RouterReplay.clear_global_router_replay_action()
    RouterReplay.clear_global_indices()
    RouterReplay.clear_global_router_replay_instances()


def scores_of(num_tokens, num_experts, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    return torch.softmax(logits, dim=-1).requires_grad_(requires_grad)


def targets_of(num_tokens, num_experts, topk, seed=0):
    """Distinct experts per token (as a router would choose), in random order."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_experts, generator=g)[:topk] for _ in range(num_tokens)])


# --------------------------------------------------------------------------------------------- the global helpers


def test_instances_are_kept_in_construction_order():
    routers = [RouterReplay() for _ in range(3)]
    assert RouterReplay.global_router_replay_instances == routers
    targets = [targets_of(4, 8, 2, seed=i) for i in range(3)]
    RouterReplay.set_replay_data(targets)
    for router, target in zip(routers, targets, strict=True):
        assert router.target_topk_idx is target
        assert router.replay_backward_list == [target]
    RouterReplay.clear_global_router_replay_instances()
    assert RouterReplay.global_router_replay_instances == []


def test_global_action_helpers_set_and_clear_every_router():
    routers = [RouterReplay() for _ in range(2)]
    assert all(r.router_replay_action is None for r in routers)
    for action in RouterReplayAction:
        RouterReplay.set_global_router_replay_action(action)
        assert all(r.router_replay_action is action for r in routers)
    routers[0].set_router_replay_action(RECORD)
    assert [r.router_replay_action for r in routers] == [RECORD, BWD]
    routers[1].clear_router_replay_action()
    assert routers[1].router_replay_action is None
    RouterReplay.clear_global_router_replay_action()
    assert all(r.router_replay_action is None for r in routers)


def test_clear_indices_forgets_recorded_target_and_fifo():
    routers = [RouterReplay() for _ in range(2)]
    RouterReplay.set_global_router_replay_action(RECORD)
    for r in routers:
        r.get_replay_topk(scores_of(4, 8), 2)
    RouterReplay.set_replay_data([targets_of(4, 8, 2)] * 2)
    RouterReplay.clear_global_indices()
    assert RouterReplay.get_recorded_data() == [None, None]
    assert all(r.target_topk_idx is None and r.replay_backward_list == [] for r in routers)


def test_cleared_routers_can_be_freed():
    router = RouterReplay()
    ref = weakref.ref(router)
    RouterReplay.clear_global_router_replay_instances()
    del router
    gc.collect()
    assert ref() is None


# ------------------------------------------------------------------------------------------------ the four actions


def test_no_action_calls_default_compute_topk_positionally():
    router = RouterReplay()
    scores = scores_of(5, 8)
    calls = []

    def spy(*args):
        calls.append(args[1:])
        return compute_topk(*args)

    probs, indices = router.get_replay_topk(scores, 3, None, None, spy)
    assert calls == [(3, None, None)]
    expected = torch.topk(scores, 3, dim=1)
    assert torch.equal(probs, expected.values) and torch.equal(indices, expected.indices)
    assert router.get_recorded_indices() is None


@pytest.mark.parametrize("groups", [None, (4, 2)], ids=["plain", "group_limited"])
def test_record_then_replay_gives_identical_indices_and_probs(groups):
    num_groups, group_topk = groups or (None, None)
    routers = [RouterReplay() for _ in range(2)]
    scores = [scores_of(6, 16, seed=i) for i in range(2)]
    RouterReplay.set_global_router_replay_action(RECORD)
    recorded = [r.get_replay_topk(s, 4, num_groups, group_topk) for r, s in zip(routers, scores, strict=True)]
    data = RouterReplay.get_recorded_data()
    for (_, indices), kept in zip(recorded, data, strict=True):
        assert kept is indices
    for action in (FWD, BWD):
        RouterReplay.clear_global_indices()
        RouterReplay.set_replay_data(data)
        RouterReplay.set_global_router_replay_action(action)
        for r, s, (probs, indices) in zip(routers, scores, recorded, strict=True):
            replayed_probs, replayed_indices = r.get_replay_topk(s, 4, num_groups, group_topk)
            assert torch.equal(replayed_indices, indices)
            assert torch.equal(replayed_probs, probs)


def test_replay_gradients_flow_to_scores_through_the_gather():
    router = RouterReplay()
    scores = scores_of(5, 8, requires_grad=True)
    target = targets_of(5, 8, 3)
    router.set_target_indices(target)
    for action in (FWD, BWD):
        scores.grad = None
        router.set_router_replay_action(action)
        probs, indices = router.get_replay_topk(scores, 3)
        assert torch.equal(probs, scores.detach().gather(1, target))
        weights = torch.arange(15, dtype=scores.dtype).view(5, 3) + 1
        (probs * weights).sum().backward()
        # d(sum w * scores[t, idx[t, k]]) / d scores: w scattered to the replayed experts, zero elsewhere.
        assert torch.equal(scores.grad, torch.zeros(5, 8).scatter_add(1, target, weights))


def test_replay_forward_uses_the_latest_target_and_keeps_the_fifo():
    router = RouterReplay()
    targets = [targets_of(4, 8, 2, seed=i) for i in range(3)]
    for t in targets:
        router.set_target_indices(t)
    router.set_router_replay_action(FWD)
    for _ in range(2):
        _, indices = router.get_replay_topk(scores_of(4, 8), 2)
        assert torch.equal(indices, targets[-1])
    assert len(router.replay_backward_list) == 3


def test_replay_backward_pops_targets_oldest_first():
    router = RouterReplay()
    targets = [targets_of(4, 8, 2, seed=i) for i in range(3)]
    for t in targets:
        router.set_target_indices(t)
    router.set_router_replay_action(BWD)
    for i, t in enumerate(targets):
        _, indices = router.get_replay_topk(scores_of(4, 8), 2)
        assert torch.equal(indices, t)
        assert len(router.replay_backward_list) == 2 - i
    with pytest.raises(RuntimeError, match="REPLAY_BACKWARD: the FIFO of targets is empty"):
        router.get_replay_topk(scores_of(4, 8), 2)


def test_replayed_indices_are_int64_and_a_fresh_tensor():
    router = RouterReplay()
    target = targets_of(4, 8, 2).to(torch.int32)
    router.set_target_indices(target)
    router.set_router_replay_action(FWD)
    _, indices = router.get_replay_topk(scores_of(4, 8), 2)
    assert indices.dtype == torch.int64 and torch.equal(indices, target.long())
    indices[0, 0] = 7 - indices[0, 0]  # the caller may write to it without touching the stored target
    assert torch.equal(router.target_topk_idx, target)


def test_action_accepts_its_string_value():
    router = RouterReplay()
    router.set_router_replay_action("replay_backward")
    assert router.router_replay_action is BWD
    with pytest.raises(ValueError, match="is not a valid RouterReplayAction"):
        router.set_router_replay_action("replay")


# ----------------------------------------------------------------------------------------- activation checkpointing


class TinyMoE(torch.nn.Module):
    """Router + experts whose output and gradients depend on the chosen experts; logs the routes it used."""

    def __init__(self, hidden=4, num_experts=8, topk=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.router = torch.nn.Parameter(torch.randn(hidden, num_experts, generator=g))
        self.experts = torch.nn.Parameter(torch.randn(num_experts, hidden, hidden, generator=g) / hidden**0.5)
        self.topk = topk
        self.replay = RouterReplay()
        self.routes = []

    def forward(self, x):
        probs, indices = self.replay.get_replay_topk(torch.softmax(x @ self.router, dim=-1), self.topk)
        self.routes.append(indices)
        expert_out = torch.einsum("th,tkhg->tkg", x, self.experts[indices])
        return x + (probs.unsqueeze(-1) * expert_out).sum(1)


def _micro_batches(n=3, num_tokens=6, hidden=4):
    g = torch.Generator().manual_seed(123)
    return [torch.randn(num_tokens, hidden, generator=g, requires_grad=True) for _ in range(n)]


def _grads(layers):
    return [p.grad.clone() for layer in layers for p in layer.parameters()]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recompute_replays_each_micro_batch_in_fifo_order(use_reentrant):
    layers = torch.nn.ModuleList([TinyMoE(seed=0), TinyMoE(seed=1)])
    model = torch.nn.Sequential(*layers)
    batches = _micro_batches()
    targets = [[targets_of(6, 8, 2, seed=10 * m + layer) for layer in range(2)] for m in range(len(batches))]

    # Reference: no checkpointing, each micro-batch replays its own targets.
    RouterReplay.set_global_router_replay_action(FWD)
    for x, t in zip(batches, targets, strict=True):
        RouterReplay.set_replay_data(t)
        model(x).square().sum().backward()
    expected = _grads(layers)
    model.zero_grad()
    RouterReplay.clear_global_indices()

    # Megatron's order: every micro-batch's forward (queueing its targets), then the backwards in the same order;
    # each backward recomputes its forward under REPLAY_BACKWARD, which pops that micro-batch's targets.
    for layer in layers:
        layer.routes.clear()
    RouterReplay.set_global_router_replay_action(FWD)
    outputs = []
    for x, t in zip(batches, targets, strict=True):
        RouterReplay.set_replay_data(t)
        outputs.append(checkpoint(model, x, use_reentrant=use_reentrant))
    RouterReplay.set_global_router_replay_action(BWD)
    for out in outputs:
        out.square().sum().backward()

    for i, layer in enumerate(layers):
        forward_routes, recomputed_routes = layer.routes[:3], layer.routes[3:]
        assert len(recomputed_routes) == 3
        for m in range(3):
            assert torch.equal(recomputed_routes[m], targets[m][i])
        assert torch.equal(forward_routes[2], targets[2][i])  # REPLAY_FORWARD: the latest target
        assert layer.replay.replay_backward_list == []
    for got, want in zip(_grads(layers), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_checkpoint_recompute_without_replay_backward_gets_routes_wrong():
    """The control for the test above: recomputing under REPLAY_FORWARD reuses the last target for every micro-batch."""
    layer = TinyMoE()
    batches = _micro_batches()
    targets = [targets_of(6, 8, 2, seed=m) for m in range(3)]
    layer.replay.set_router_replay_action(FWD)
    for x, t in zip(batches, targets, strict=True):
        layer.replay.set_target_indices(t)
        layer(x).square().sum().backward()
    expected = _grads([layer])
    layer.zero_grad()
    outputs = []
    for x, t in zip(batches, targets, strict=True):
        layer.replay.set_target_indices(t)
        outputs.append(checkpoint(layer, x, use_reentrant=False))
    for out in outputs:
        out.square().sum().backward()
    assert not all(torch.allclose(g, e) for g, e in zip(_grads([layer]), expected, strict=True))


# ------------------------------------------------------------------------------------------ group-limited top-k


def literal_group_limited_topk(scores, topk, num_groups, group_topk):
    """Token by token, in plain Python: the DeepSeek-V3 / Megatron group-limited routing rule."""
    num_experts = scores.shape[1]
    size = num_experts // num_groups
    values, indices = [], []
    for row in scores.tolist():
        groups = [row[g * size : (g + 1) * size] for g in range(num_groups)]
        group_score = [sum(sorted(group, reverse=True)[: topk // group_topk]) for group in groups]
        best_groups = sorted(range(num_groups), key=lambda g: group_score[g], reverse=True)[:group_topk]
        allowed = [e for g in best_groups for e in range(g * size, (g + 1) * size)]
        chosen = sorted(allowed, key=lambda e: row[e], reverse=True)[:topk]
        values.append([row[e] for e in chosen])
        indices.append(chosen)
    return torch.tensor(values, dtype=scores.dtype), torch.tensor(indices)


@pytest.mark.parametrize(
    "num_tokens, num_experts, num_groups, group_topk, topk",
    [(16, 16, 4, 2, 4), (9, 32, 8, 4, 8), (5, 12, 3, 1, 3), (7, 8, 8, 3, 3)],
)
def test_group_limited_topk_equals_the_literal_reference(num_tokens, num_experts, num_groups, group_topk, topk):
    scores = scores_of(num_tokens, num_experts, seed=num_experts)
    want_values, want_indices = literal_group_limited_topk(scores, topk, num_groups, group_topk)
    values, indices = group_limited_topk(scores, topk, num_groups, group_topk)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values)
    # The default compute path of get_replay_topk is the same function.
    probs, via_router = RouterReplay().get_replay_topk(scores, topk, num_groups, group_topk)
    assert torch.equal(via_router, want_indices) and torch.equal(probs, values)
    # With one expert per group the limit cannot bind; otherwise these inputs make it bind (it is exercised).
    one_per_group = num_experts == num_groups
    assert torch.equal(indices, torch.topk(scores, topk).indices) == one_per_group


def test_group_limited_topk_gradients_reach_the_selected_scores():
    scores = scores_of(6, 16, requires_grad=True)
    values, indices = compute_topk(scores, 4, num_groups=4, group_topk=2)
    values.sum().backward()
    assert torch.equal(scores.grad, torch.zeros(6, 16).scatter_(1, indices, 1.0))


@pytest.mark.parametrize(
    "num_groups, group_topk, topk, match",
    [
        (3, 2, 4, "num_groups=3 must divide the 16 experts"),
        (None, 2, 4, "num_groups=None must divide"),
        (4, 5, 5, r"group_topk=5 must be in \[1, num_groups=4\]"),
        (4, 2, 1, r"topk=1 must be in \[group_topk, group_topk \* experts per group\] = \[2, 8\]"),
        (4, 2, 9, r"topk=9 must be in .* = \[2, 8\]"),
    ],
)
def test_group_limited_topk_rejects_bad_groups(num_groups, group_topk, topk, match):
    with pytest.raises(ValueError, match=match):
        compute_topk(scores_of(4, 16), topk, num_groups, group_topk)


# -------------------------------------------------------------------------------------------------- static buffer


def test_static_buffer_records_in_place_without_reallocating():
    routers = [RouterReplay() for _ in range(3)]
    buffer = torch.full((10, 3, 2), -1, dtype=torch.long)
    RouterReplay.set_global_static_buffers(buffer)
    RouterReplay.set_global_router_replay_action(RECORD)
    first_views = None
    for num_tokens in (8, 5):  # fewer tokens later: only the first rows change
        buffer.fill_(-1)
        chosen = [r.get_replay_topk(scores_of(num_tokens, 8, seed=i), 2)[1] for i, r in enumerate(routers)]
        recorded = RouterReplay.get_recorded_data()
        for layer, (indices, kept) in enumerate(zip(chosen, recorded, strict=True)):
            assert torch.equal(buffer[:num_tokens, layer], indices)
            assert kept.data_ptr() == buffer[0, layer].data_ptr() and kept.shape == (num_tokens, 2)
        assert (buffer[num_tokens:] == -1).all()
        first_views = first_views or [r.static_buffer for r in routers]
        assert all(r.static_buffer is v for r, v in zip(routers, first_views, strict=True))

    RouterReplay.clear_global_static_buffers()
    _, indices = routers[0].get_replay_topk(scores_of(4, 8), 2)
    assert routers[0].get_recorded_indices() is indices


def test_static_buffer_errors():
    routers = [RouterReplay() for _ in range(2)]
    with pytest.raises(ValueError, match=r"expected a \[max_tokens, num_layers=2, topk\] buffer, got \[10, 3, 2\]"):
        RouterReplay.set_global_static_buffers(torch.zeros(10, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="expected a"):
        RouterReplay.set_global_static_buffers(torch.zeros(10, 2, dtype=torch.long))
    RouterReplay.set_global_static_buffers(torch.zeros(4, 2, 2, dtype=torch.long))
    routers[0].set_router_replay_action(RECORD)
    with pytest.raises(ValueError, match=r"\[5, 2\] indices do not fit the static buffer \[4, 2\]"):
        routers[0].get_replay_topk(scores_of(5, 8), 2)
    with pytest.raises(ValueError, match=r"\[3, 3\] indices do not fit"):
        routers[0].get_replay_topk(scores_of(3, 8), 3)


# --------------------------------------------------------------------------------------------------------- errors


def test_set_replay_data_needs_one_tensor_per_router():
    RouterReplay(), RouterReplay()
    with pytest.raises(ValueError, match="got 3 tensors of indices for 2 router instances"):
        RouterReplay.set_replay_data([targets_of(4, 8, 2)] * 3)
    with pytest.raises(ValueError, match="got 1 tensors of indices for 2 router instances"):
        RouterReplay.set_replay_data([targets_of(4, 8, 2)])


@pytest.mark.parametrize("action", [FWD, BWD])
@pytest.mark.parametrize("shape", [(5, 2), (4, 3), (4, 1)])
def test_target_must_be_tokens_by_topk(action, shape):
    router = RouterReplay()
    router.set_target_indices(torch.zeros(shape, dtype=torch.long))
    router.set_router_replay_action(action)
    with pytest.raises(ValueError, match=rf"target indices must have shape \[T, topk\] = \[4, 2\], got \[{shape[0]}"):
        router.get_replay_topk(scores_of(4, 8), 2)
    if action is BWD:
        assert len(router.replay_backward_list) == 1  # a rejected target stays queued


def test_set_target_indices_rejects_non_matrices_and_non_integers():
    router = RouterReplay()
    with pytest.raises(ValueError, match=r"expected a \[T, topk\] tensor of indices, got \[8\]"):
        router.set_target_indices(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="indices must be integers, got torch.float32"):
        router.set_target_indices(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="expected a"):
        router.set_target_indices([[0, 1]])


def test_target_indices_must_name_experts():
    router = RouterReplay()
    router.set_target_indices(torch.tensor([[0, 8], [1, 2]]))
    router.set_router_replay_action(FWD)
    with pytest.raises(ValueError, match=r"target indices must be in \[0, 8\)"):
        router.get_replay_topk(scores_of(2, 8), 2)


def test_replay_forward_without_a_target():
    router = RouterReplay()
    router.set_router_replay_action(FWD)
    with pytest.raises(RuntimeError, match="REPLAY_FORWARD: no target indices; call set_target_indices"):
        router.get_replay_topk(scores_of(4, 8), 2)


def test_replay_backward_with_an_empty_fifo():
    router = RouterReplay()
    router.set_router_replay_action(BWD)
    with pytest.raises(RuntimeError, match="REPLAY_BACKWARD: the FIFO of targets is empty"):
        router.get_replay_topk(scores_of(4, 8), 2)


def test_replay_needs_two_dimensional_scores():
    router = RouterReplay()
    router.set_target_indices(targets_of(4, 8, 2))
    router.set_router_replay_action(FWD)
    with pytest.raises(ValueError, match=r"scores must be \[T, num_experts\], got \[1, 4, 8\]"):
        router.get_replay_topk(scores_of(4, 8)[None], 2)
