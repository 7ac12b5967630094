"""Sort-based dispatch and expert counts -> `moe_init_routing_v2` (dropless, full expert range, no quantisation).

The eager forms (torchtitan, DeepSeek / HF references, vLLM-style references):

    order = argsort(topk_ids.view(-1), stable=True)    # copies j = t*K + k, grouped by expert, stable
    token = order // K                                  # source token of each row
    routed = x[token]  (or index_select, or gather with token[:, None].expand(-1, H))
    counts = bincount(topk_ids.view(-1), minlength=E)   (or histc(..., bins=E, min=0, max=E), or its cumsum)

`moe_init_routing_v2(x, ids, expert_num=E, row_idx_type=1)` computes exactly these: `expanded_x[i] = x[order[i] //
K]` and, in the scatter form, `expanded_row_idx = order` (SPEC §4). Its counts are `[E]` int64, type 1 (count) or 0
(cumsum). All this holds only when every id lies in `[0, E)` (the op sorts other ids to the tail, argsort does not;
bincount makes longer outputs): so ids must be the indices of a `topk` over the last dim of `[T, E]` scores in the
same graph, with the K the code divides by. `bincount`'s output length is data-dependent (a host sync on GPU); the
op's is static.

A counts form is rewritten into its own call with a zero-width `x`; `finish` then folds it into the dispatch call
over the same ids, so one sort serves both.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import stable_topological_sort

from ._rewrite import Rewrite, example_value, record_values, same, specialize, static_int
from .multihot import topk_shape

log = logging.getLogger("moe_inductor")

_init = torch.ops.moe_inductor.moe_init_routing_v2.default
_CUMSUM, _COUNT = 0, 1
_COUNTS_ONLY = "moe_inductor_counts_only"  # meta key of calls made by a counts rewrite (zero-width x)


def _call(x, expert_idx, num_experts, counts=None, row_idx_type=0):
    """Dropless, full range, no quantisation; counts of type `counts` (None: none)."""
    flag = counts is not None
    return _init(x, expert_idx, None, None, -1, -1, num_experts, 0, counts if flag else 0, flag, -1, [], row_idx_type)


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch: stable argsort of the flat ids, source token = position // K, gather of the token rows
# ---------------------------------------------------------------------------------------------------------------------


def _sort_index_select(x, expert_idx, topk):
    order = expert_idx.view(-1).argsort(stable=True)
    token = order // topk
    return x.index_select(0, token), order, token


# torchtitan: `torch.gather(x, dim=0, index=token.reshape(-1, 1).expand(-1, dim))`; the expanded index is often
# reused by the combine's scatter_add, so it is an output too.
def _sort_gather(x, expert_idx, topk, hidden):
    order = expert_idx.view(-1).argsort(stable=True)
    token = order // topk
    index = token.unsqueeze(1).expand(-1, hidden)
    return x.gather(0, index), order, token, index


def _dispatch_replace(match, x, expert_idx, topk, hidden=None):
    num_experts = _experts(match)
    out = _call(x, expert_idx, num_experts, row_idx_type=1)
    order = out[1].to(torch.int64)  # the scatter-form row index is the stable order itself
    token = order // topk
    if hidden is None:
        return out[0], order, token
    return out[0], order, token, token.unsqueeze(1).expand(-1, hidden)


def _experts(match) -> int:
    return specialize(topk_shape(match.kwargs["expert_idx"])[1])


def _dispatch_check(match, x, expert_idx, topk, hidden=None):
    ids, rows = example_value(expert_idx), example_value(x)
    found = topk_shape(expert_idx)
    # The ids must be in [0, E) and K per token: a top-k over the E columns, and the K the code divides by.
    ok = found is not None and found[0] is not None and static_int(topk) == found[0]
    ok = ok and rows.dim() == 2 and ids.dim() == 2 and rows.dtype.is_floating_point
    if hidden is not None:
        ok = ok and same(hidden, rows.shape[1])  # a narrower expand would gather only some columns
    return ok and same(rows.shape[0], ids.shape[0]) and _experts(match) is not None


# ---------------------------------------------------------------------------------------------------------------------
# Counts per expert
# ---------------------------------------------------------------------------------------------------------------------


def _bincount(expert_idx, num_experts):
    return expert_idx.view(-1).bincount(minlength=num_experts)


def _bincount_cumsum(expert_idx, num_experts):
    return expert_idx.view(-1).bincount(minlength=num_experts).cumsum(0)


# torchtitan: histc over the flat ids (a float copy on CPU, where histc has no integer kernel).
def _histc(expert_idx, num_experts, dtype):
    return expert_idx.view(-1).to(dtype).histc(bins=num_experts, min=0, max=num_experts)


def _counts_replace(kind):
    def replace(match, expert_idx, num_experts, dtype=None):
        num_tokens = static_int(example_value(match.kwargs["expert_idx"]).shape[0])
        if num_tokens is None:
            num_tokens = expert_idx.size(0)
        x = expert_idx.new_empty((num_tokens, 0), dtype=torch.float32)  # counts only: no rows to move
        out = _call(x, expert_idx, _experts(match), counts=kind)
        out.node.meta[_COUNTS_ONLY] = True
        out_dtype = example_value(match.output_node()).dtype  # histc counts in the dtype of its input
        return out[2] if out_dtype == torch.int64 else out[2].to(out_dtype)

    return replace


def _counts_check(match, expert_idx, num_experts, dtype=None):
    found = topk_shape(expert_idx)
    # minlength / bins must be E exactly: a longer minlength pads zeros the op does not make.
    ok = found is not None and static_int(num_experts) is not None
    # float32 holds every count exactly (up to 2**24 copies); fp16 / bf16 counts would round where ours do not.
    ok = ok and example_value(match.output_node()).dtype in (torch.float32, torch.float64, torch.int64)
    return ok and _experts(match) == static_int(num_experts)


# ---------------------------------------------------------------------------------------------------------------------
# One sort for dispatch and counts
# ---------------------------------------------------------------------------------------------------------------------


def _ancestors(node: fx.Node) -> set:
    seen, frontier = set(), [node]
    while frontier:
        for arg in frontier.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                frontier.append(arg)
    return seen


def _shares_routing(into: fx.Node, counts: fx.Node) -> bool:
    """Whether `counts` (a counts-only call) can take its counts from `into`: same ids and E, and `into` neither
    computes other counts (a count can give a cumsum, not the reverse) nor depends on `counts`."""
    if into is counts or into.args[1] is not counts.args[1] or into.args[6] != counts.args[6]:
        return False
    if into.args[9] and into.args[8] not in (counts.args[8], _COUNT):
        return False
    return counts not in _ancestors(into)


def finish(graph: fx.Graph) -> None:
    """Fold every counts-only call into another call over the same ids, preferring a dispatch call: one sort."""
    calls = list(graph.find_nodes(op="call_function", target=_init))
    calls.sort(key=lambda n: bool(n.meta.get(_COUNTS_ONLY)))  # dispatch calls first
    # Counts before cumsums: a call that gives counts can serve a cumsum too.
    for counts in sorted((n for n in calls if n.meta.get(_COUNTS_ONLY)), key=lambda n: n.args[8] != _COUNT):
        into = next((n for n in calls if not n._erased and _shares_routing(n, counts)), None)
        if into is None:
            continue
        new_nodes = [into]
        if not into.args[9]:
            args = list(into.args)
            args[8], args[9] = counts.args[8], True
            into.args = tuple(args)
        if into.args[8] == counts.args[8]:
            counts.replace_all_uses_with(into)
        else:  # counts of `into`, cumsum wanted
            with graph.inserting_after(into):
                cumsum = graph.call_function(torch.Tensor.cumsum, (None, 0))
                total = graph.call_function(operator.getitem, (into, 2))
            cumsum.args = (total, 0)
            for user in list(counts.users):
                user.replace_all_uses_with(cumsum)
                graph.erase_node(user)
            new_nodes += [total, cumsum]
        zero_x = counts.args[0]
        graph.erase_node(counts)
        if not zero_x.users:
            graph.erase_node(zero_x)
        stable_topological_sort(graph)
        record_values(graph, new_nodes)
        log.info("moe_inductor: counts of %s come from %s", into.args[1].name, into.name)


_OPTIONAL = (torch.Tensor.contiguous, torch.Tensor.to)

REWRITES = [
    Rewrite("init_routing_sort_gather", _sort_gather, _dispatch_replace, _dispatch_check),
    Rewrite("init_routing_sort_index_select", _sort_index_select, _dispatch_replace, _dispatch_check),
    Rewrite("init_routing_bincount_cumsum", _bincount_cumsum, _counts_replace(_CUMSUM), _counts_check),
    Rewrite("init_routing_bincount", _bincount, _counts_replace(_COUNT), _counts_check),
    Rewrite("init_routing_histc", _histc, _counts_replace(_COUNT), _counts_check, _OPTIONAL),
]
