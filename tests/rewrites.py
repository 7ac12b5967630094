"""Helpers for the pattern-rewrite tests: capture the rewritten Dynamo graph, compile with the backend, compare."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

from moe_inductor.patterns import COUNTER, rewrite_pass


def rewritten_graph(fn, *args, only=None) -> str:
    """The code of `fn`'s Dynamo graph after our pass (what AOTAutograd then traces)."""
    seen = []

    def capture(gm, example_inputs):
        rewrite_pass(only)(gm.graph)
        seen.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
        torch.compile(fn, backend=capture, fullgraph=True)(*args)
    assert len(seen) == 1
    return seen[0]


def leaves(args, grad: bool):
    return [
        a.detach().clone().requires_grad_(grad and a.is_floating_point()) if torch.is_tensor(a) else a for a in args
    ]


def compile_and_compare(fn, *args, grad: bool = True, dynamic_rows=(), backend="moe_inductor") -> dict:
    """Run `fn` eagerly and compiled with the backend (fresh caches): outputs and grads equal; returns counters.

    `dynamic_rows` lists the arguments whose dim 0 (the token count) is marked dynamic.
    """
    eager_args, compiled_args = leaves(args, grad), leaves(args, grad)
    for i in dynamic_rows:
        torch._dynamo.maybe_mark_dynamic(compiled_args[i], 0)
    expected = fn(*eager_args)
    torch._dynamo.reset()
    counters.clear()
    with fresh_cache():
        actual = torch.compile(fn, backend=backend)(*compiled_args)
        outs = [o for o in (actual if isinstance(actual, (tuple, list)) else (actual,)) if o is not None]
        exps = [o for o in (expected if isinstance(expected, (tuple, list)) else (expected,)) if o is not None]
        for a, e in zip(outs, exps, strict=True):
            torch.testing.assert_close(a, e)
        if grad:
            weights = [torch.randn_like(e) if e.is_floating_point() else None for e in exps]
            loss = sum((e * w).sum() for e, w in zip(exps, weights, strict=False) if w is not None)
            loss.backward()
            sum((a * w).sum() for a, w in zip(outs, weights, strict=False) if w is not None).backward()
            for ea, ca in zip(eager_args, compiled_args, strict=False):
                if torch.is_tensor(ea) and ea.requires_grad:
                    torch.testing.assert_close(ca.grad, ea.grad)
    return dict(counters[COUNTER])
