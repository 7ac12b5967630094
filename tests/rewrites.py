"""Helpers for the pattern-rewrite tests: capture the rewritten Dynamo graph, compile with the backend, compare.

A positive case runs `check_rewrite` (rewritten graph, counters, results and grads equal to eager under the
`moe_inductor` backend, no graph break); a near miss runs `check_not_rewritten` (no counter, and the graph our pass
canonicalized still computes what eager does).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache
from torch.testing import FileCheck

from moe_inductor.backends.inductor import DYNAMO_SETTINGS
from moe_inductor.patterns import COUNTER, rewrite_pass


def _mark_dynamic(args, dynamic_rows) -> None:
    for i in dynamic_rows:
        torch._dynamo.maybe_mark_dynamic(args[i], 0)


def rewritten_graph(fn, *args, only=None, dynamic_rows=()) -> str:
    """The code of `fn`'s Dynamo graph after our pass (what AOTAutograd then traces)."""
    seen = []

    def capture(gm, example_inputs):
        rewrite_pass(only)(gm.graph)
        seen.append(gm.code)
        return gm.forward

    args = leaves(args, grad=False)
    _mark_dynamic(args, dynamic_rows)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(DYNAMO_SETTINGS):
        torch.compile(fn, backend=capture, fullgraph=True)(*args)
    assert len(seen) == 1
    return seen[0]


def leaves(args, grad: bool):
    return [
        a.detach().clone().requires_grad_(grad and a.is_floating_point()) if torch.is_tensor(a) else a for a in args
    ]


def _flat(out) -> list:
    return [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o is not None]


def _compare(fn, compiled, args, grad: bool, dynamic_rows, exact) -> None:
    """Outputs of `compiled(*args)` equal `fn(*args)`, and so do the grads of a random linear function of them."""
    eager_args, compiled_args = leaves(args, grad), leaves(args, grad)
    _mark_dynamic(compiled_args, dynamic_rows)
    exps, outs = _flat(fn(*eager_args)), _flat(compiled(*compiled_args))
    for i, (a, e) in enumerate(zip(outs, exps, strict=True)):
        bitwise = exact is True or (isinstance(exact, tuple) and i in exact)
        torch.testing.assert_close(a, e, **({"rtol": 0, "atol": 0} if bitwise else {}))
    if grad:
        weights = [torch.randn_like(e) if e.is_floating_point() else None for e in exps]
        if any(w is not None and e.requires_grad for e, w in zip(exps, weights, strict=True)):
            sum((e * w).sum() for e, w in zip(exps, weights, strict=True) if w is not None).backward()
            sum((a * w).sum() for a, w in zip(outs, weights, strict=True) if w is not None).backward()
        for ea, ca in zip(eager_args, compiled_args, strict=True):
            if torch.is_tensor(ea) and ea.requires_grad:
                torch.testing.assert_close(ca.grad, ea.grad)


def compile_and_compare(
    fn, *args, grad: bool = True, dynamic_rows=(), backend="moe_inductor", exact=False, dynamic=None
) -> dict:
    """Run `fn` eagerly and compiled with the backend (fresh caches): outputs and grads equal; returns counters.

    `dynamic_rows` lists the arguments whose dim 0 (the token count) is marked dynamic; `dynamic` is
    torch.compile's; `exact` asks for bitwise equal outputs (True: all, a tuple: those positions).
    """
    torch._dynamo.reset()
    counters.clear()
    with fresh_cache():
        _compare(fn, torch.compile(fn, backend=backend, dynamic=dynamic), args, grad, dynamic_rows, exact)
    return dict(counters[COUNTER])


def graph_breaks(fn, *args) -> int:
    torch._dynamo.reset()
    with torch._dynamo.config.patch(DYNAMO_SETTINGS):
        return torch._dynamo.explain(fn)(*leaves(args, grad=False)).graph_break_count


def check_rewrite(
    fn,
    *args,
    expected: dict,
    present: tuple = (),
    absent: tuple = (),
    check: Optional[Callable[[str], None]] = None,
    dynamic_rows=(),
    exact=False,
    grad: bool = True,
) -> str:
    """The positive case: counters equal `expected` exactly, the rewritten graph has each of `present` (our ops, in
    order) and none of `absent` (the eager ops it replaced), fwd and grads equal to eager under the backend, and
    Dynamo captures one graph. Returns the rewritten graph's code for extra checks."""
    code = rewritten_graph(fn, *args, dynamic_rows=dynamic_rows)
    file_check = FileCheck()
    for op in present:
        file_check = file_check.check(op)
    file_check.run(code)
    for op in absent:
        FileCheck().check_not(op).run(code)
    if check is not None:
        check(code)
    got = compile_and_compare(fn, *args, dynamic_rows=dynamic_rows, exact=exact, grad=grad)
    assert got == expected, got
    assert graph_breaks(fn, *args) == 0
    return code


def check_not_rewritten(fn, *args, grad: bool = True, expected: Optional[dict] = None) -> None:
    """The near miss: nothing is rewritten (or only the rewrites of other families in `expected`), and the graph
    our pass canonicalized computes what eager does."""

    def pass_then_run(gm, example_inputs):
        rewrite_pass()(gm.graph)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(DYNAMO_SETTINGS):
        _compare(fn, torch.compile(fn, backend=pass_then_run), args, grad, (), exact=True)
    assert dict(counters[COUNTER]) == (expected or {})
