"""A whole MoE layer through the public ops: the demo, graph breaks, recompilation."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from moe_inductor import demo, ops
from samples import rand, routing_map


@pytest.mark.slow
def test_demo_passes(capsys):
    assert demo.main([]) == 0
    out = capsys.readouterr().out
    assert "torch.compile(fullgraph=True)" in out and "demo passed" in out


def test_moe_layer_has_no_graph_break():
    inputs = demo._inputs(40, 16, 5, 8)
    explanation = torch._dynamo.explain(demo.moe_layer)(*inputs, 2)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_dynamic_layer_compiles_once_for_all_token_counts():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    layer = torch.compile(demo.moe_layer, backend=counter, fullgraph=True, dynamic=True)
    for num_tokens in (33, 57, 90):
        inputs = demo._inputs(num_tokens, 16, 5, 8, seed=num_tokens)
        out = layer(*inputs, 2)
        torch.testing.assert_close(out, demo.moe_layer(*inputs, 2), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.slow
def test_data_dependent_permute_compiles_once_for_all_routings():
    """Megatron's num_out_tokens=None: the row count is an unbacked size, not a guard, so no recompile."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")

    def layer(tokens, rmap, probs):
        permuted, _, idx = ops.permute(tokens, rmap)
        return ops.unpermute(torch.nn.functional.silu(permuted), idx, tokens.shape, probs=probs, routing_map=rmap)

    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    for seed, unrouted in ((0, 0.1), (1, 0.4), (2, 0.0)):
        rmap, probs = routing_map(24, 6, 3, seed=seed, unrouted=unrouted)
        tokens = rand(24, 8, seed=seed)
        torch.testing.assert_close(compiled(tokens, rmap, probs), layer(tokens, rmap, probs))
    assert counter.frame_count == 1
