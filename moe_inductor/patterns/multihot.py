"""Dense routing map and probs map from top-k ids -> `indices_to_multihot`.

Also home of `topk_experts_per_row`: the provenance test other families use to prove that a routing map has
exactly K experts per token (then a permute of it has the static size T*K and needs no host sync).
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ._rewrite import Rewrite, example_value, node_of, producer, same, setitem, specialize, static_int

Tensor = torch.Tensor
_multihot = torch.ops.moe_inductor.indices_to_multihot.default


def _routing(indices, num_experts):
    """Our op for a map built from ids only: a dummy probs row (the probs map output is unused)."""
    return _multihot(indices, indices.new_ones(indices.shape, dtype=torch.float32), num_experts)


# Megatron `topk_routing_with_score_function`: routing_map = zeros_like(logits).int().scatter(1, ids, 1).bool()
def _int_scatter_map(logits, indices):
    return torch.zeros_like(logits).int().scatter(1, indices, 1).bool()


def _width(logits) -> Optional[int]:
    # The op takes the number of experts as an int: under dynamic=True it is specialized (guarded), see `specialize`.
    return specialize(example_value(node_of(logits)).shape[1])


def _int_scatter_map_replace(match, logits, indices):
    return _routing(indices, _width(logits))[1]


# A bool buffer scattered with True (HF / torchtitan style).
def _bool_scatter_map(logits, indices):
    return torch.zeros_like(logits, dtype=torch.bool).scatter(1, indices, True)


# The probs map: routing_probs = zeros_like(logits).scatter(1, ids, probs)
def _probs_scatter(logits, indices, probs):
    return torch.zeros_like(logits).scatter(1, indices, probs)


def _probs_scatter_replace(match, logits, indices, probs):
    return _multihot(indices, probs, _width(logits))[0]


# Expert counts per token: F.one_hot(ids, E).sum(1) (0/1 when ids are distinct).
def _one_hot_sum(indices, num_experts):
    return F.one_hot(indices, num_experts).sum(1)


def _one_hot_sum_replace(match, indices, num_experts):
    return _routing(indices, specialize(node_of(num_experts)))[1].to(torch.int64)


# Megatron's flex dispatcher `_indices_to_multihot`: ids of -1 (experts of other ranks) are skipped.
def _masked_assignment(indices, probs, shape, num_tokens, device):
    routing_map = torch.zeros(shape, dtype=torch.long, device=device)
    probs_map = torch.zeros(shape, dtype=torch.float, device=device)
    mask = indices != -1
    valid_indices = indices[mask]
    row_indices = torch.arange(num_tokens, device=device).repeat_interleave(mask.sum(dim=1))
    # routing_map[row_indices, valid_indices] = 1; probs_map[...] = probs[mask] (fx cannot trace item assignment)
    routing_map = setitem(routing_map, (row_indices, valid_indices), 1)
    probs_map = setitem(probs_map, (row_indices, valid_indices), probs[mask])
    return routing_map.bool(), probs_map


def _masked_assignment_replace(match, indices, probs, shape, num_tokens, device):
    probs_map, routing_map = _multihot(indices, probs.to(torch.float32), specialize(_shape(shape)[1]))
    return routing_map, probs_map


def _shape(shape):
    """A captured shape: a literal tuple, or a node (`x.size()` under dynamic shapes)."""
    return example_value(node_of(shape)) if isinstance(node_of(shape), torch.fx.Node) else shape


def _scatter_check(match, logits, indices, probs=None):
    scores, ids = example_value(node_of(logits)), example_value(node_of(indices))
    ok = scores.dim() == 2 and ids.dim() == 2 and ids.dtype == torch.int64
    if probs is not None:
        # scatter with repeated ids keeps an arbitrary one of the probs; only ids from a top-k are distinct.
        ok = ok and example_value(probs).dtype == scores.dtype and topk_source(indices) is not None
        ok = ok and same(example_value(probs).shape[0], ids.shape[0])
    return ok and same(ids.shape[0], scores.shape[0]) and _width(logits) is not None


def _one_hot_check(match, indices, num_experts):
    ids, found = example_value(indices), topk_shape(indices)
    # one_hot raises for an id >= num_classes where the op would skip it: the ids must be below num_classes.
    return ids.dim() == 2 and found is not None and specialize(num_experts) >= specialize(found[1])


def _masked_assignment_check(match, indices, probs, shape, num_tokens, device):
    ids, p, shape = example_value(indices), example_value(probs), _shape(shape)
    ok = ids.dim() == 2 and p.dim() == 2 and len(shape) == 2
    return ok and same(p.shape[0], ids.shape[0], shape[0], num_tokens) and specialize(shape[1]) is not None


REWRITES = [
    Rewrite("multihot_masked_assignment", _masked_assignment, _masked_assignment_replace, _masked_assignment_check),
    Rewrite("multihot_int_scatter", _int_scatter_map, _int_scatter_map_replace, _scatter_check),
    Rewrite("multihot_bool_scatter", _bool_scatter_map, _int_scatter_map_replace, _scatter_check),
    Rewrite("multihot_probs_scatter", _probs_scatter, _probs_scatter_replace, _scatter_check),
    Rewrite("multihot_one_hot_sum", _one_hot_sum, _one_hot_sum_replace, _one_hot_check),
]


# ---------------------------------------------------------------------------------------------------------------------
# Provenance: does a routing map provably hold exactly K experts per token?
# ---------------------------------------------------------------------------------------------------------------------


def topk_shape(indices) -> Optional[tuple[Optional[int], Any]]:
    """(K, width E of the scores) when `indices` is the index output of a `topk` over the last dim of a 2-D tensor.

    K is an int or None (symbolic); E as recorded (a SymInt under dynamic=True: `specialize` it where an int is due).
    Such ids are distinct within a row and lie in `[0, E)`.
    """
    node = node_of(indices)
    if not (producer(node, operator.getitem) and node.args[1] == 1):
        return None
    topk = producer(node.args[0], Tensor.topk)
    if topk is None:
        return None
    k = topk.args[1] if len(topk.args) > 1 else topk.kwargs.get("k")
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    scores = example_value(topk.args[0])
    if scores is None or scores.dim() != 2 or dim not in (-1, 1):
        return None
    return static_int(k), scores.shape[-1]


def topk_source(indices) -> Optional[int]:
    """K when `indices` is the index output of a `topk` over the last dim of a 2-D tensor, else None."""
    found = topk_shape(indices)
    return None if found is None else found[0]


def topk_experts_per_row(routing_map) -> Optional[int]:
    """K if every row of `routing_map` provably has exactly K experts: a multihot of top-k ids over all columns."""
    node = node_of(routing_map)
    while producer(node, Tensor.to, Tensor.contiguous) is not None:
        node = node.args[0]
    if producer(node, operator.getitem) and node.args[1] == 1:
        multihot = producer(node.args[0], _multihot)
        found = topk_shape(multihot.args[0]) if multihot is not None else None
        if found is not None and found[0] is not None and specialize(found[1]) == static_int(multihot.args[2]):
            return found[0]
    return None
