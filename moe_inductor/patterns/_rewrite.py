"""The machinery every rewrite family shares: canonical graph form, search/replace registration, the graph pass.

Rewrites run on the graph Dynamo captures (torch-level IR), before AOTAutograd. That placement is what makes them
useful: AOTAutograd then traces our ops exactly as if the user had called them, so the backward comes from our
autograd formulas (fused kernels, no `index_add`/`masked_scatter` chains), every size downstream of a rewritten
data-dependent op becomes static again, and on CUDA our ops still decompose into inline Triton kernels. Matching the
same code after AOTAutograd would leave the unbacked sizes of `masked_select` baked into every downstream node.

Torch-level IR spells one computation many ways (`x.masked_select(m)` or `torch.masked_select(x, m)`, `.bool()` or
`.to(torch.bool)`, `.T` or `.t()`, `buf.scatter_add_(...)` on a fresh `zeros`). `canonicalize` rewrites a graph into
one spelling, without changing what it computes, and search functions are traced and canonicalized the same way, so
one search function covers the spellings. Each family module declares `Rewrite`s (a search function written the way
users write the code, a replacement that calls our ops, and a semantic check), and `RewritePass` applies them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import operator
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch._dynamo.utils import counters
from torch._inductor.pattern_matcher import (
    CallFunction,
    KeywordArg,
    Match,
    MultiOutputPattern,
    PatternExpr,
    PatternMatcherPass,
    register_graph_pattern,
    stable_topological_sort,
)

log = logging.getLogger("moe_inductor")

#: `torch._dynamo.utils.counters[COUNTER][rewrite name]` counts applied rewrites (Inductor's own
#: `pattern_matcher_count` also counts its built-in patterns).
COUNTER = "moe_inductor"

Tensor = torch.Tensor

# torch.<fn>(x, ...) that is the same call as x.<fn>(...): canonical form is the Tensor method.
_FUNCTION_TO_METHOD = {
    getattr(torch, name): getattr(Tensor, name)
    for name in (
        "argsort",
        "bincount",
        "cumsum",
        "flatten",
        "gather",
        "histc",
        "index_add",
        "index_select",
        "masked_select",
        "reshape",
        "scatter",
        "scatter_add",
        "sort",
        "sum",
        "t",
        "topk",
        "transpose",
        "unsqueeze",
    )
}

# x.bool() and friends are x.to(dtype).
_DTYPE_METHODS = {
    Tensor.bool: torch.bool,
    Tensor.int: torch.int32,
    Tensor.long: torch.int64,
    Tensor.float: torch.float32,
    Tensor.half: torch.float16,
    Tensor.bfloat16: torch.bfloat16,
    Tensor.double: torch.float64,
}

# Arguments users pass by position or by name, as (positional names, keyword defaults). Canonical form: the
# positional names by position (a tuple lists a name's aliases), everything else by keyword with defaults filled in.
_SIGNATURES = {
    Tensor.argsort: ((), {"dim": -1, "descending": False, "stable": False}),
    Tensor.sort: ((), {"dim": -1, "descending": False, "stable": False}),
    Tensor.bincount: ((), {"weights": None, "minlength": 0}),
    Tensor.histc: ((), {"bins": 100, "min": 0, "max": 0}),
    Tensor.topk: (("k",), {"dim": -1, "largest": True, "sorted": True}),
    Tensor.cumsum: (("dim",), {}),
    Tensor.sum: (("dim",), {}),
    Tensor.gather: (("dim", "index"), {}),
    Tensor.index_select: (("dim", "index"), {}),
    Tensor.scatter: (("dim", "index", ("src", "value")), {}),
    Tensor.scatter_add: (("dim", "index", "src"), {}),
    Tensor.index_add: (("dim", "index", "source"), {}),
    torch._C._nn.one_hot: (("num_classes",), {}),
}

# In-place ops that `canonicalize` turns functional when they write a fresh buffer nobody else can see.
_INPLACE_TO_FUNCTIONAL = {
    Tensor.scatter_add_: Tensor.scatter_add,
    Tensor.scatter_: Tensor.scatter,
    Tensor.index_add_: Tensor.index_add,
    Tensor.index_put_: Tensor.index_put,
    Tensor.masked_fill_: Tensor.masked_fill,
}
_WRITES = set(_INPLACE_TO_FUNCTIONAL) | {operator.setitem}
_FRESH_BUFFERS = {torch.zeros, torch.zeros_like, torch.full, torch.full_like, torch.empty, Tensor.new_zeros}


def example_value(node: Any) -> Any:
    """The fake value Dynamo (or Inductor) recorded for `node`; None when absent or not a node."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def _ndim(node: fx.Node) -> Optional[int]:
    value = example_value(node)
    return value.dim() if isinstance(value, torch.Tensor) else None


def _set_target(node: fx.Node, target: Callable, args: tuple, kwargs: Optional[dict] = None) -> None:
    node.op = "call_function"
    node.target = target
    node.args = args
    node.kwargs = kwargs if kwargs is not None else {}


def canonicalize(graph: fx.Graph, *, assume_2d: bool = False) -> None:
    """Rewrite `graph` in place into the one spelling patterns are written in; values are unchanged.

    `assume_2d` is for search functions, which have no shape metadata: their `.T` is always 2-D.
    """
    for node in list(graph.nodes):
        if node.op == "call_method" and isinstance(node.target, str) and hasattr(Tensor, node.target):
            _set_target(node, getattr(Tensor, node.target), node.args, node.kwargs)
        if node.op != "call_function":
            continue
        if node.target in _FUNCTION_TO_METHOD:
            node.target = _FUNCTION_TO_METHOD[node.target]
        if node.target in (torch.floor_divide, Tensor.floor_divide) or (
            node.target in (torch.div, Tensor.div) and node.kwargs == {"rounding_mode": "floor"}
        ):
            _set_target(node, operator.floordiv, node.args[:2])  # `a // b` is floor_divide on tensors
        if node.target in _DTYPE_METHODS and len(node.args) == 1 and not node.kwargs:
            _set_target(node, Tensor.to, (node.args[0], _DTYPE_METHODS[node.target]))
        elif node.target is Tensor.to and len(node.args) == 1 and set(node.kwargs) == {"dtype"}:
            _set_target(node, Tensor.to, (node.args[0], node.kwargs["dtype"]))
        elif node.target is Tensor.view and all(isinstance(a, (int, fx.Node)) for a in node.args[1:]):
            node.target = Tensor.reshape  # same values wherever the view was legal
        elif node.target is Tensor.flatten and len(node.args) == 1 and not node.kwargs:
            _set_target(node, Tensor.reshape, (node.args[0], -1))
        elif node.target is operator.getitem and _is_row_index(node.args[1], assume_2d):
            _set_target(node, Tensor.index_select, (node.args[0], 0, node.args[1]))
        elif node.target is operator.getitem and node.args[1] == (Ellipsis, None):
            _set_target(node, Tensor.unsqueeze, (node.args[0], -1))
        elif node.target is operator.getitem and _leading_slice(node.args[1]) is not None:
            dim, stop = _leading_slice(node.args[1])
            # A slice past the end is clamped, narrow would raise: only a cut that provably keeps `stop` entries.
            if assume_2d or _keeps(node, dim, stop):
                _set_target(node, Tensor.narrow, (node.args[0], dim, 0, stop))
        elif node.target is getattr and node.args[1:] == ("T",):
            if assume_2d or _ndim(node.args[0]) == 2:
                _set_target(node, Tensor.t, (node.args[0],))
        elif node.target is Tensor.transpose and node.args[1:] in ((0, 1), (1, 0), (-1, -2), (-2, -1)):
            if assume_2d or _ndim(node.args[0]) == 2:
                _set_target(node, Tensor.t, (node.args[0],))
        if node.target in (Tensor.reshape, Tensor.view) and node.args[1:] in ((-1, 1), ((-1, 1),)):
            if _ndim(node.args[0]) == 1:
                _set_target(node, Tensor.unsqueeze, (node.args[0], 1))  # a column of a 1-D tensor
    _drop_size_asserts(graph)
    _functionalize_fresh_buffers(graph)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _SIGNATURES:
            _normalize_arguments(node, assume_2d)
        if node.op == "call_function" and node.kwargs:
            node.kwargs = dict(sorted(node.kwargs.items()))  # patterns compare keyword order too
    _sort_indices_to_argsort(graph)


def _normalize_arguments(node: fx.Node, search: bool) -> None:
    """Rewrite a call of `_SIGNATURES` into its canonical argument form (see there); unknown keywords stay."""
    positional, defaults = _SIGNATURES[node.target]
    args, kwargs = list(node.args), dict(node.kwargs)
    for i, names in enumerate(positional, start=1):
        names = names if isinstance(names, tuple) else (names,)
        found = [n for n in names if n in kwargs]
        if len(args) == i and found:
            args.append(kwargs.pop(found[0]))
    extra, args = args[1 + len(positional) :], args[: 1 + len(positional)]
    for name, value in zip(defaults, extra, strict=False):
        kwargs[name] = value
    kwargs = {**defaults, **kwargs}
    if "dim" in defaults and isinstance(kwargs["dim"], int) and kwargs["dim"] >= 0 and not search:
        if _ndim(node.args[0]) == kwargs["dim"] + 1:
            kwargs["dim"] = -1  # the last dim, spelled as search functions spell it
    node.args, node.kwargs = tuple(args), kwargs


def _sort_indices_to_argsort(graph: fx.Graph) -> None:
    """`x.sort(...)[1]` with the values unused is `x.argsort(...)`."""
    for node in list(graph.find_nodes(op="call_function", target=Tensor.sort)):
        users = list(node.users)
        if users and all(u.target is operator.getitem and u.args[1] == 1 for u in users):
            node.target = Tensor.argsort
            for user in users:
                user.replace_all_uses_with(node)
                graph.erase_node(user)


_SIZE_ARITHMETIC = {operator.ge, operator.le, operator.gt, operator.lt, operator.eq, operator.ne, operator.and_}


def _is_row_index(index: Any, search: bool) -> bool:
    """`x[index]` is `x.index_select(0, index)`: a 1-D integer tensor (in search functions: any plain argument)."""
    if not isinstance(index, fx.Node):
        return False
    if search:
        return index.op == "placeholder"
    value = example_value(index)
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 1
        and not value.is_floating_point()
        and (value.dtype != torch.bool)
    )


def _leading_slice(index: Any) -> Optional[tuple[int, Any]]:
    """(dim, n) when `index` is `[:n]` or `[:, :n]` (then `x[index]` is `x.narrow(dim, 0, n)`), else None."""
    full = slice(None, None, None)
    if isinstance(index, tuple) and len(index) == 2 and index[0] == full:
        dim, index = 1, index[1]
    else:
        dim = 0
    if isinstance(index, slice) and index.start is None and index.step is None and index.stop is not None:
        return dim, index.stop
    return None


def _keeps(node: fx.Node, dim: int, stop: Any) -> bool:
    """Whether the slice `node` provably kept `stop` entries of `dim` (Dynamo recorded its result's shape)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    value = example_value(node)
    if not isinstance(value, torch.Tensor) or value.dim() <= dim:
        return False
    stop = example_value(stop) if isinstance(stop, fx.Node) else stop
    return isinstance(stop, (int, torch.SymInt)) and statically_known_true(value.shape[dim] == stop)


def _drop_size_asserts(graph: fx.Graph) -> None:
    """Remove Dynamo's range asserts on data-dependent sizes (`u0 >= 0`, `u0 <= T*E`, `Eq(u0, u1)`).

    They hang off the sizes of `masked_select`/`nonzero` results and would pin those nodes in place; they only
    restate what the ops guarantee, and AOTAutograd re-inserts the asserts of sizes that survive the rewrites.
    """
    for node in list(graph.find_nodes(op="call_function", target=torch.ops.aten._assert_scalar.default)):
        chain, frontier = [node], [node.args[0]]
        while frontier:
            arg = frontier.pop()
            if not isinstance(arg, fx.Node):
                continue
            if arg.op == "call_function" and arg.target in _SIZE_ARITHMETIC:
                chain.append(arg)
                frontier.extend(arg.args)
            elif arg.op == "call_function" and arg.target is torch.ops.aten.sym_size.int:
                chain.append(arg)
            else:
                break
        else:
            for dead in chain:  # in creation order reversed: users first
                if not dead.users:
                    graph.erase_node(dead)


def setitem(buf: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """Functional `buf[index] = value` on a fresh buffer (what `canonicalize` turns that statement into)."""
    out = buf.clone()
    out[index] = value
    return out


def _functionalize_fresh_buffers(graph: fx.Graph) -> None:
    """`buf = zeros(...); buf.scatter_add_(...); use(buf)` -> `buf2 = zeros(...).scatter_add(...); use(buf2)`.

    Only when `buf` is a freshly created tensor, the in-place op is its first user and it has no view or alias
    that could observe the difference; then the functional form computes the same values.
    """
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        functional = setitem if node.target is operator.setitem else _INPLACE_TO_FUNCTIONAL.get(node.target)
        if functional is None or not node.args:
            continue
        buf = node.args[0]
        if not (isinstance(buf, fx.Node) and buf.op == "call_function" and buf.target in _FRESH_BUFFERS):
            continue
        users = sorted(buf.users, key=order.__getitem__)
        if users[0] is not node:
            continue
        if any(user.op == "call_function" and user.target in _WRITES for user in users[1:]):
            continue  # written again later: leave the sequence alone
        node.target = functional
        for user in users[1:]:
            user.replace_input_with(buf, node)


# ---------------------------------------------------------------------------------------------------------------------
# Search functions -> patterns
# ---------------------------------------------------------------------------------------------------------------------


def trace_search(search: Callable, argnames: Sequence[str]) -> fx.Graph:
    """Trace a search function with every argument symbolic (tensors, sizes, dtypes, devices alike)."""
    tracer = fx.Tracer(autowrap_functions=(setitem,))  # fx proxies refuse `buf[idx] = v`: searches call setitem
    graph = tracer.trace(search)
    placeholders = [n.target for n in graph.nodes if n.op == "placeholder"]
    if list(placeholders) != list(argnames):
        raise AssertionError(f"{search.__name__}: arguments {placeholders} != {list(argnames)}")
    canonicalize(graph, assume_2d=True)
    return graph


def without(graph: fx.Graph, targets: Sequence[Callable]) -> Optional[fx.Graph]:
    """A copy of `graph` without its calls of `targets` (e.g. `.contiguous()`); None unless each target occurs."""
    if not all(any(n.op == "call_function" and n.target is t for n in graph.nodes) for t in targets):
        return None
    copy = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in targets:
            env[node] = env[node.args[0]]
        else:
            env[node] = copy.node_copy(node, env.__getitem__)
    return copy


def to_pattern(graph: fx.Graph) -> PatternExpr:
    """An Inductor pattern from a canonical graph: arguments become `KeywordArg`s that capture what they match."""
    patterns: dict[fx.Node, Any] = {}

    def convert(arg: Any) -> Any:
        return torch.fx.node.map_arg(arg, patterns.__getitem__)

    outputs: Any = None
    for node in graph.nodes:
        if node.op == "placeholder":
            patterns[node] = KeywordArg(node.target)
        elif node.op == "call_function":
            patterns[node] = CallFunction(
                node.target, *convert(node.args), _users=max(len(node.users), 1), **convert(node.kwargs)
            )
        elif node.op == "output":
            outputs = convert(node.args[0])
        else:
            raise AssertionError(f"unsupported node in a search function: {node.format_node()}")
    if isinstance(outputs, (tuple, list)):
        return MultiOutputPattern(list(outputs))
    return outputs


# ---------------------------------------------------------------------------------------------------------------------
# Rewrites and the pass
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One eager form and what replaces it.

    `search(*args)` is the eager code as users write it, every argument symbolic (sizes, dtypes and devices too:
    whatever the user's graph has there is captured by name). `replace(match, **captured)` builds the replacement
    with the captured values as `fx.Proxy`s and returns one value per output of `search`. `check(match,
    **captured)` decides from shapes and provenance whether the replacement computes the same values.
    `optional` lists value-preserving calls (`.contiguous()`) that user code may or may not spell out.
    """

    name: str
    search: Callable
    replace: Callable
    check: Callable[..., bool] = lambda match, **captured: True
    optional: tuple = (Tensor.contiguous,)

    @property
    def argnames(self) -> tuple[str, ...]:
        code = self.search.__code__
        return code.co_varnames[: code.co_argcount]

    def patterns(self) -> list[PatternExpr]:
        """One pattern per subset of `optional` calls left out (variants that leave out nothing new are skipped)."""
        graph = trace_search(self.search, self.argnames)
        variants, seen = [], set()
        for r in range(len(self.optional) + 1):
            for dropped in itertools.combinations(self.optional, r):
                variant = without(graph, dropped) if dropped else graph
                if variant is not None and str(variant) not in seen:
                    seen.add(str(variant))
                    variants.append(to_pattern(variant))
        return variants


def _apply(rewrite: Rewrite, match: Match, graph: fx.Graph, node: fx.Node) -> None:
    outputs = match.output_nodes()
    last = max(match.nodes, key=list(graph.nodes).index)
    tracer = fx.proxy.GraphAppendingTracer(graph)
    captured = {k: fx.Proxy(v, tracer) if isinstance(v, fx.Node) else v for k, v in match.kwargs.items()}
    before = set(graph.nodes)
    with graph.inserting_before(last):
        results = rewrite.replace(match, **captured)
    new_nodes = [n for n in graph.nodes if n not in before]
    if not isinstance(results, (tuple, list)):
        results = (results,)
    if len(results) != len(outputs):
        raise AssertionError(f"{rewrite.name}: replacement returned {len(results)} values for {len(outputs)} outputs")
    for old, new in zip(outputs, results, strict=True):
        if old is not None:
            old.replace_all_uses_with(new.node if isinstance(new, fx.Proxy) else new)
    match.erase_nodes()
    stable_topological_sort(graph)
    record_values(graph, new_nodes)
    counters[COUNTER][rewrite.name] += 1
    log.info("moe_inductor rewrite %s at %s", rewrite.name, node.name)
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "moe_inductor_rewrite", "encoding": "string"},
        payload_fn=lambda: f"{rewrite.name} at {node.name}",
    )


def record_values(graph: fx.Graph, new_nodes: Sequence[fx.Node]) -> None:
    """Give `new_nodes` (a replacement's nodes), and everything downstream of them, fresh fake values.

    Later checks read shapes from them; a permute that lost its data-dependent size changes every shape after it.
    """
    placeholders = graph.find_nodes(op="placeholder")
    fake_mode = next(
        (
            v.fake_mode
            for n in placeholders
            if isinstance(v := example_value(n), torch.Tensor) and hasattr(v, "fake_mode")
        ),
        None,
    )
    if fake_mode is None:
        return
    stale = set(new_nodes)
    shape_env = fake_mode.shape_env
    ignore_fresh = (
        shape_env.ignore_fresh_unbacked_symbols()
        if shape_env is not None and hasattr(shape_env, "ignore_fresh_unbacked_symbols")
        else contextlib.nullcontext()
    )
    with fake_mode, ignore_fresh:
        for node in graph.nodes:
            if node not in stale and not any(arg in stale for arg in node.all_input_nodes):
                continue
            stale.add(node)
            if node.op not in ("call_function", "call_method"):
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), example_value)
            try:
                if node.op == "call_method":
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    value = node.target(*args, **kwargs)
            except Exception:  # keep Dynamo's value (e.g. asserts on sizes that are now static)
                log.debug("moe_inductor: no fake value for %s", node.format_node(), exc_info=True)
                continue
            node.meta["example_value"] = value


def _check(rewrite: Rewrite) -> Callable[[Match], bool]:
    def check(match: Match) -> bool:
        try:
            return bool(rewrite.check(match, **match.kwargs))
        except Exception:  # a check that cannot decide (missing metadata, odd types) means no rewrite
            log.debug("moe_inductor: check of %s failed", rewrite.name, exc_info=True)
            return False

    return check


def build_pass(rewrites: Sequence[Rewrite], name: str) -> PatternMatcherPass:
    """One `PatternMatcherPass` holding every pattern variant of `rewrites`."""
    matcher = PatternMatcherPass(pass_name=name)
    for rewrite in rewrites:
        for pattern in rewrite.patterns():
            register_graph_pattern(pattern, extra_check=_check(rewrite), pass_dict=matcher)(
                lambda match, *args, _rewrite=rewrite, **kwargs: _apply(_rewrite, match, match.graph, match.nodes[-1])
            )
    return matcher


def node_of(value: Any) -> Any:
    """The fx node behind a captured value (Proxies in `replace`, nodes in `check`)."""
    return value.node if isinstance(value, fx.Proxy) else value


def producer(node: Any, *targets: Callable) -> Optional[fx.Node]:
    """`node` if it is a call of one of `targets`, else None."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets:
        return node
    return None


def static_int(value: Any) -> Optional[int]:
    """A Python int for `value` (an int, or a node whose recorded value is a plain int); None if symbolic."""
    if isinstance(value, int):
        return value
    recorded = example_value(value)
    return recorded if isinstance(recorded, int) else None


def same(*values: Any) -> bool:
    """Whether sizes (ints, SymInts, or nodes recording them) are equal in every run of this graph.

    Provably equal sizes pass as they are. Two different backed symbols (token dims of two inputs that Dynamo made
    dynamic separately) pass when they are equal now, with a guard that makes Dynamo recompile for inputs where
    they differ (the eager code needs them equal anyway). Data-dependent sizes pass only when provably equal.
    Call it last in a check: a guard stays even when a later condition refuses the rewrite.
    """
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    resolved = [example_value(v) if isinstance(v, fx.Node) else v for v in values]
    if any(v is None for v in resolved):
        return False
    return all(guard_or_false(a == b) for a, b in zip(resolved, resolved[1:], strict=False))


def specialize(value: Any) -> Optional[int]:
    """A Python int for a size that an op takes as `int` (the number of experts): plain ints as they are, a backed
    symbol (`dynamic=True` makes every dim symbolic) specialized to its current value with a guard, so that a
    different value recompiles. None for data-dependent sizes. A dim marked with strict `torch._dynamo.mark_dynamic`
    cannot be specialized (Dynamo then reports a constraint violation); use `maybe_mark_dynamic` for such dims.
    """
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, guard_int

    value = example_value(value) if isinstance(value, fx.Node) else value
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt) and not free_unbacked_symbols(value):
        return guard_int(value)
    return None


__all__ = [
    "COUNTER",
    "Rewrite",
    "build_pass",
    "canonicalize",
    "example_value",
    "node_of",
    "producer",
    "record_values",
    "same",
    "specialize",
    "static_int",
]
