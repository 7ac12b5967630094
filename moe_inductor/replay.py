"""RouterReplay: record the experts a router chose in one pass and force the same choice in another.

RL training of MoE models computes log-probabilities with the rollout's routes (REPLAY_FORWARD) and, under
activation checkpointing, recomputes the forward with those routes again during backward (REPLAY_BACKWARD, one
FIFO entry per micro-batch, oldest first). The API is Megatron-LM's `router_replay` (SPEC.md section 6); what
differs is that it runs inside `torch.compile` with no graph break and no recompile when targets change:

* Traced code branches on a private mode derived from the action (plain / record / replay), so Dynamo guards on
  that: one graph per mode. REPLAY_FORWARD and REPLAY_BACKWARD share one graph, which is what activation
  checkpointing needs: the recompute must save exactly the tensors the original forward saved.
* The replayed indices come from the custom op `moe_inductor::router_replay_target`, opaque to Dynamo: its fake
  kernel promises a `[T, topk]` int64 tensor, and its real kernel runs in the compiled code at every call,
  returning the latest target (REPLAY_FORWARD) or popping the FIFO (REPLAY_BACKWARD). No Python list or tensor
  identity is guarded, so fresh targets every step and a FIFO of changing length reuse the graph. The op is
  marked side-effectful so no pass drops a pop.
* RECORD stores the indices on the instance (Dynamo replays that attribute write after the graph). With a static
  buffer (`set_global_static_buffers`, `[max_tokens, num_layers, topk]`) it copies into the buffer in place
  instead, so a captured CUDA graph writes the routes of every replay into the same memory.

Replay itself is not CUDA-graph safe (the target is Python state read at run time); the op is tagged
`cudagraph_unsafe` where torch knows that tag, so Inductor keeps it out of its CUDA graphs.
"""

from __future__ import annotations

import itertools
import weakref
from enum import Enum
from typing import Callable, List, Optional, Tuple

import torch

__all__ = ["RouterReplay", "RouterReplayAction", "compute_topk", "group_limited_topk"]

TopkFn = Callable[[torch.Tensor, int, Optional[int], Optional[int]], Tuple[torch.Tensor, torch.Tensor]]


class RouterReplayAction(Enum):
    """What `RouterReplay.get_replay_topk` does; no action (None) means plain routing."""

    RECORD = "record"  # route normally and keep the chosen indices
    REPLAY_FORWARD = "replay_forward"  # use `target_topk_idx` instead of routing
    REPLAY_BACKWARD = "replay_backward"  # use the oldest target not yet replayed (recompute in backward)


# ---------------------------------------------------------------------------------------------------------------
# Default top-k (Megatron's `topk_routing_with_score_function` inner `compute_topk`)
# ---------------------------------------------------------------------------------------------------------------


def group_limited_topk(
    scores: torch.Tensor, topk: int, num_groups: int, group_topk: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k restricted to the `group_topk` best of `num_groups` contiguous expert groups (DeepSeek-V3 routing).

    A group's score is the sum of its `topk // group_topk` largest expert scores; experts outside the chosen groups
    are masked to -inf before the final top-k. Returns `(values, indices)`, each `[T, topk]`, values sorted
    descending; gradients flow to `scores` through the values.
    """
    num_tokens, num_experts = scores.shape
    if num_groups is None or num_groups <= 0 or num_experts % num_groups != 0:
        raise ValueError(f"group-limited top-k: num_groups={num_groups} must divide the {num_experts} experts")
    per_group = num_experts // num_groups
    if not 1 <= group_topk <= num_groups:
        raise ValueError(f"group-limited top-k: group_topk={group_topk} must be in [1, num_groups={num_groups}]")
    if not group_topk <= topk <= group_topk * per_group:
        raise ValueError(
            f"group-limited top-k: topk={topk} must be in [group_topk, group_topk * experts per group] = "
            f"[{group_topk}, {group_topk * per_group}]"
        )
    grouped = scores.reshape(num_tokens, num_groups, per_group)
    group_scores = grouped.topk(topk // group_topk, dim=-1).values.sum(dim=-1)
    chosen = group_scores.topk(group_topk, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
    keep = keep.unsqueeze(-1).expand(num_tokens, num_groups, per_group).reshape(num_tokens, num_experts)
    return scores.masked_fill(~keep, float("-inf")).topk(topk, dim=-1)


def compute_topk(
    scores: torch.Tensor, topk: int, num_groups: Optional[int] = None, group_topk: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The default `default_compute_topk`: group-limited top-k when `group_topk` is set, else plain top-k."""
    if group_topk:
        return group_limited_topk(scores, topk, num_groups, group_topk)
    return torch.topk(scores, k=topk, dim=1)


# ---------------------------------------------------------------------------------------------------------------
# The replay target as an opaque op
# ---------------------------------------------------------------------------------------------------------------

# Instances by id, for the op's real kernel (a custom op cannot take arbitrary objects). Weak, so that dropping a
# router (or `clear_global_router_replay_instances`) still frees it.
_LIVE: "weakref.WeakValueDictionary[int, RouterReplay]" = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count()

# cudagraph_unsafe: the op reads Python state, which a captured graph would not see again on replay.
_TAGS = [getattr(torch.Tag, name) for name in ("cudagraph_unsafe", "flexible_layout") if hasattr(torch.Tag, name)]


@torch.library.custom_op("moe_inductor::router_replay_target", mutates_args=(), tags=_TAGS)
def _router_replay_target(scores: torch.Tensor, replay_key: torch.Tensor, topk: int) -> torch.Tensor:
    """The indices the router with id `replay_key` replays now, as a new int64 tensor on `scores`' device.

    REPLAY_FORWARD: its latest target. REPLAY_BACKWARD: the oldest target of its FIFO, popped. `scores` supplies
    the token count (for the shape check), the device and a data dependency; its values are not read.
    `replay_key` is a 0-dim CPU tensor, not an int: Dynamo guards on the value of an int attribute, so compiling
    one block for every layer would recompile for each layer's router; a tensor is a graph input instead.
    """
    replay_id = int(replay_key)
    router = _LIVE.get(replay_id)
    if router is None:
        raise RuntimeError(f"RouterReplay: router {replay_id} no longer exists")
    return router._take_target(scores, topk).to(device=scores.device, dtype=torch.long, copy=True)


@_router_replay_target.register_fake
def _(scores: torch.Tensor, replay_key: torch.Tensor, topk: int) -> torch.Tensor:
    return scores.new_empty((scores.shape[0], topk), dtype=torch.long)


# Never dead-code eliminated, even when the caller drops the indices: a REPLAY_BACKWARD pop must still happen.
if hasattr(torch.fx.node, "has_side_effect"):
    torch.fx.node.has_side_effect(torch.ops.moe_inductor.router_replay_target.default)


def _check_target(target: torch.Tensor, scores: torch.Tensor, topk: int, action: str) -> None:
    """Shape check; range check too when the target is on the CPU (free there; a device sync elsewhere)."""
    num_tokens, num_experts = scores.shape
    if target.dim() != 2 or target.shape[0] != num_tokens or target.shape[1] != topk:
        raise ValueError(
            f"RouterReplay {action}: target indices must have shape [T, topk] = [{num_tokens}, {topk}], "
            f"got {list(target.shape)}"
        )
    if target.device.type == "cpu" and target.numel() and (target.min() < 0 or target.max() >= num_experts):
        raise ValueError(f"RouterReplay {action}: target indices must be in [0, {num_experts}) (the experts)")


# ---------------------------------------------------------------------------------------------------------------
# RouterReplay
# ---------------------------------------------------------------------------------------------------------------


# The branch of `get_replay_topk` each action takes (see the `router_replay_action` setter).
_MODES = {
    None: None,
    RouterReplayAction.RECORD: "record",
    RouterReplayAction.REPLAY_FORWARD: "replay",
    RouterReplayAction.REPLAY_BACKWARD: "replay",
}


class RouterReplay:
    """Records and replays one router's top-k choice; the class holds every router, in construction order.

    Create one per MoE layer, in layer order, and call `get_replay_topk` where the router takes its top-k. The
    static methods drive all routers at once: `set_global_router_replay_action`, `set_replay_data` (one target per
    layer), `get_recorded_data` (one recording per layer), and the `clear_*` helpers.
    """

    #: Every live router, in construction order (the order of `set_replay_data` / `get_recorded_data` lists).
    global_router_replay_instances: List["RouterReplay"] = []

    # -- global helpers ----------------------------------------------------------------------------------------

    @staticmethod
    def set_replay_data(all_layers_topk_indices: List[torch.Tensor]) -> None:
        """Give each router its target: `all_layers_topk_indices[i]` goes to the i-th router constructed."""
        routers = RouterReplay.global_router_replay_instances
        if len(all_layers_topk_indices) != len(routers):
            raise ValueError(
                f"RouterReplay.set_replay_data: got {len(all_layers_topk_indices)} tensors of indices for "
                f"{len(routers)} router instances (one per layer expected)"
            )
        for router, indices in zip(routers, all_layers_topk_indices, strict=True):
            router.set_target_indices(indices)

    @staticmethod
    def get_recorded_data() -> List[Optional[torch.Tensor]]:
        """The indices each router recorded last (None where none), in construction order."""
        return [router.get_recorded_indices() for router in RouterReplay.global_router_replay_instances]

    @staticmethod
    def clear_global_indices() -> None:
        """Forget every router's recorded indices, target and FIFO."""
        for router in RouterReplay.global_router_replay_instances:
            router.clear_indices()

    @staticmethod
    def set_global_router_replay_action(router_replay_action: RouterReplayAction) -> None:
        """Set the action of every router."""
        for router in RouterReplay.global_router_replay_instances:
            router.set_router_replay_action(router_replay_action)

    @staticmethod
    def clear_global_router_replay_action() -> None:
        """Back to plain routing for every router."""
        for router in RouterReplay.global_router_replay_instances:
            router.clear_router_replay_action()

    @staticmethod
    def clear_global_router_replay_instances() -> None:
        """Forget all routers (they stop being addressed by the global helpers and can be freed)."""
        RouterReplay.global_router_replay_instances.clear()

    @staticmethod
    def set_global_static_buffers(static_buffer: torch.Tensor) -> None:
        """Record into `static_buffer` (`[max_tokens, num_layers, topk]`): router i writes `[:T, i, :]` in place."""
        routers = RouterReplay.global_router_replay_instances
        if static_buffer.dim() != 3 or static_buffer.shape[1] != len(routers):
            raise ValueError(
                f"RouterReplay.set_global_static_buffers: expected a [max_tokens, num_layers={len(routers)}, topk] "
                f"buffer, got {list(static_buffer.shape)}"
            )
        for layer, router in enumerate(routers):
            router.set_static_buffer(static_buffer[:, layer, :])

    @staticmethod
    def clear_global_static_buffers() -> None:
        """Back to recording fresh tensors for every router."""
        for router in RouterReplay.global_router_replay_instances:
            router.clear_static_buffer()

    # -- one router --------------------------------------------------------------------------------------------

    def __init__(self) -> None:
        """A router's replay state; registers itself at the end of `global_router_replay_instances`."""
        self.target_topk_idx: Optional[torch.Tensor] = None
        self.recorded_topk_idx: Optional[torch.Tensor] = None
        self.router_replay_action: Optional[RouterReplayAction] = None
        # Targets not yet replayed by REPLAY_BACKWARD, oldest first.
        self.replay_backward_list: List[torch.Tensor] = []
        self.static_buffer: Optional[torch.Tensor] = None
        replay_id = next(_NEXT_ID)
        self._replay_key = torch.tensor(replay_id)  # see `_router_replay_target`
        _LIVE[replay_id] = self
        RouterReplay.global_router_replay_instances.append(self)

    @property
    def router_replay_action(self) -> Optional[RouterReplayAction]:
        """This router's action (None: plain routing)."""
        return self._action

    @router_replay_action.setter
    def router_replay_action(self, action: Optional[RouterReplayAction]) -> None:
        self._action = None if action is None else RouterReplayAction(action)
        # What traced code branches on (so what Dynamo guards on): REPLAY_FORWARD and REPLAY_BACKWARD are the same
        # graph, told apart at run time by the target op. Checkpointing needs that: the recompute (REPLAY_BACKWARD)
        # must save exactly the tensors the forward (REPLAY_FORWARD) saved, and only the same graph guarantees it.
        self._mode = _MODES[self._action]

    def set_target_indices(self, topk_indices: torch.Tensor) -> None:
        """Route the next REPLAY_FORWARD call to `topk_indices` (`[T, topk]`) and queue them for REPLAY_BACKWARD."""
        if not isinstance(topk_indices, torch.Tensor) or topk_indices.dim() != 2:
            shape = list(topk_indices.shape) if isinstance(topk_indices, torch.Tensor) else type(topk_indices)
            raise ValueError(f"RouterReplay.set_target_indices: expected a [T, topk] tensor of indices, got {shape}")
        if topk_indices.is_floating_point() or topk_indices.is_complex() or topk_indices.dtype == torch.bool:
            raise ValueError(f"RouterReplay.set_target_indices: indices must be integers, got {topk_indices.dtype}")
        self.target_topk_idx = topk_indices
        self.replay_backward_list.append(topk_indices)

    def get_recorded_indices(self) -> Optional[torch.Tensor]:
        """The indices recorded by the last RECORD call (a view of the static buffer in static-buffer mode)."""
        return self.recorded_topk_idx

    def record_indices(self, topk_indices: torch.Tensor) -> None:
        """Keep `topk_indices`; with a static buffer, copy them into its first T rows instead (no allocation)."""
        if self.static_buffer is None:
            self.recorded_topk_idx = topk_indices
            return
        num_tokens = topk_indices.shape[0]
        if num_tokens > self.static_buffer.shape[0] or topk_indices.shape[1] != self.static_buffer.shape[1]:
            raise ValueError(
                f"RouterReplay.record_indices: {list(topk_indices.shape)} indices do not fit the static buffer "
                f"{list(self.static_buffer.shape)} ([max_tokens, topk])"
            )
        recorded = self.static_buffer[:num_tokens]
        recorded.copy_(topk_indices)
        self.recorded_topk_idx = recorded

    def clear_indices(self) -> None:
        """Forget the recorded indices, the target and the FIFO."""
        self.recorded_topk_idx = None
        self.target_topk_idx = None
        self.replay_backward_list = []

    def set_router_replay_action(self, router_replay_action: RouterReplayAction) -> None:
        """Set this router's action."""
        self.router_replay_action = RouterReplayAction(router_replay_action)

    def clear_router_replay_action(self) -> None:
        """Back to plain routing for this router."""
        self.router_replay_action = None

    def set_static_buffer(self, buffer: torch.Tensor) -> None:
        """Record into `buffer` (`[max_tokens, topk]`, any strides) in place, e.g. memory a CUDA graph captured."""
        if buffer.dim() != 2:
            raise ValueError(f"RouterReplay.set_static_buffer: expected [max_tokens, topk], got {list(buffer.shape)}")
        # Under Inductor's CUDA graphs a mutated input must have a fixed address to stay in the graph.
        torch._dynamo.mark_static_address(buffer, guard=False)  # no id guard: one graph for every layer's buffer
        self.static_buffer = buffer

    def clear_static_buffer(self) -> None:
        """Back to recording fresh tensors."""
        self.static_buffer = None

    def get_replay_topk(
        self,
        scores: torch.Tensor,
        topk: int,
        num_groups: Optional[int] = None,
        group_topk: Optional[int] = None,
        default_compute_topk: Optional[TopkFn] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-k of `scores` (`[T, E]`) under this router's action; returns `(probs, indices)`, each `[T, topk]`.

        No action: `default_compute_topk(scores, topk, num_groups, group_topk)` (default `compute_topk`: plain or
        group-limited). RECORD: the same, and the indices are recorded. REPLAY_FORWARD / REPLAY_BACKWARD: the
        indices are the target (the latest one / the oldest one not yet replayed, popped) and `probs` gathers
        `scores` at them, so gradients still reach `scores`.
        """
        mode = self._mode
        if mode == "replay":
            if scores.dim() != 2:
                raise ValueError(f"RouterReplay: scores must be [T, num_experts], got {list(scores.shape)}")
            indices = torch.ops.moe_inductor.router_replay_target(scores, self._replay_key, topk)
            return scores.gather(1, indices), indices
        compute = compute_topk if default_compute_topk is None else default_compute_topk
        probs, indices = compute(scores, topk, num_groups, group_topk)
        if mode == "record":
            self.record_indices(indices)
        return probs, indices

    def _take_target(self, scores: torch.Tensor, topk: int) -> torch.Tensor:
        """The target to replay now (run by the target op, never traced); pops it under REPLAY_BACKWARD."""
        action = self._action
        if action is RouterReplayAction.REPLAY_FORWARD:
            if self.target_topk_idx is None:
                raise RuntimeError(
                    "RouterReplay REPLAY_FORWARD: no target indices; call set_target_indices or set_replay_data first"
                )
            _check_target(self.target_topk_idx, scores, topk, action.name)
            return self.target_topk_idx
        if action is RouterReplayAction.REPLAY_BACKWARD:
            if not self.replay_backward_list:
                raise RuntimeError(
                    "RouterReplay REPLAY_BACKWARD: the FIFO of targets is empty; each recompute pops one target "
                    "queued by set_target_indices/set_replay_data, and all have been replayed"
                )
            _check_target(self.replay_backward_list[0], scores, topk, action.name)  # before popping: keep it
            return self.replay_backward_list.pop(0)
        raise RuntimeError(f"RouterReplay: router is not replaying (action {action})")
