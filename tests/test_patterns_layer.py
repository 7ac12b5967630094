"""A Megatron-style MoE layer in plain eager torch, compiled with the moe_inductor backend: every routing step is
rewritten into our ops, no graph break, no host sync, results and gradients equal to eager."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.testing import FileCheck

import moe_inductor
from moe_inductor.backends.inductor import STATIC_LAUNCH_ENV
from moe_inductor.patterns import rewrite_pass
from moe_inductor.testing.eager import megatron_permute_masked_select, megatron_unpermute
from rewrites import compile_and_compare, rewritten_graph


TOPK = 2


def moe_layer(x, w_router, w1, w2):
    """Router top-k, Megatron's multihot, permute (masked_select), two expert matmuls, unpermute (scatter_add)."""
    logits = x @ w_router
    probs, top_indices = torch.topk(torch.softmax(logits, dim=-1), TOPK, dim=-1)
    routing_map = torch.zeros_like(logits).int().scatter(1, top_indices, 1).bool()
    routing_probs = torch.zeros_like(logits).scatter(1, top_indices, probs)
    permuted, _, sorted_indices = megatron_permute_masked_select(x, routing_map, routing_probs)
    hidden = torch.nn.functional.silu(permuted @ w1) @ w2
    return megatron_unpermute(hidden, sorted_indices, x.shape, routing_probs, routing_map)


def layer_inputs(tokens=37, experts=6, hidden=12, ffn=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(tokens, hidden, generator=g),
        torch.randn(hidden, experts, generator=g),
        torch.randn(hidden, ffn, generator=g) / hidden**0.5,
        torch.randn(ffn, hidden, generator=g) / ffn**0.5,
    )


EXPECTED = {
    "multihot_int_scatter": 1,
    "multihot_probs_scatter": 1,
    "permute_masked_select_probs": 1,
    "combine_scatter_add_probs": 1,
}


def test_rewritten_graph_has_our_ops_and_no_data_dependent_op():
    code = rewritten_graph(moe_layer, *layer_inputs())
    (
        FileCheck()
        .check_count("torch.ops.moe_inductor.indices_to_multihot.default", 2, exactly=True)
        .check("torch.ops.moe_inductor.permute.default")
        .check("torch.ops.moe_inductor.unpermute.default")
        .check_not("masked_select")
        .check_not("scatter_add")
        .run(code)
    )
    # The routing map comes from a top-2: the permute has the static row count T*K = 74 (no host sync).
    FileCheck().check("moe_inductor.permute.default(").check("74, False)").run(code)


@pytest.mark.slow
def test_layer_compiles_with_backend_equal_to_eager_fwd_and_bwd():
    assert compile_and_compare(moe_layer, *layer_inputs()) == EXPECTED


@pytest.mark.slow
@pytest.mark.parametrize("dynamic_tokens", [False, True], ids=["static", "dynamic_tokens"])
def test_no_graph_break_and_no_host_sync_in_generated_code(dynamic_tokens):
    from torch._inductor.utils import fresh_cache, run_and_get_code

    inputs = layer_inputs()
    if dynamic_tokens:
        torch._dynamo.maybe_mark_dynamic(inputs[0], 0)
    torch._dynamo.reset()
    with fresh_cache():
        _, code = run_and_get_code(torch.compile(moe_layer, backend="moe_inductor"), *inputs)
    text = "\n".join(code)
    for sync in ("masked_select", "nonzero", "_local_scalar_dense", ".item()"):
        assert sync not in text, sync
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
        assert torch._dynamo.explain(moe_layer)(*layer_inputs()).graph_break_count == 0


@pytest.mark.slow
def test_dynamic_token_count_keeps_static_rows():
    """With the token dim dynamic the permute still has T*K rows (symbolic, not data-dependent)."""
    code = rewritten_graph(moe_layer, *layer_inputs(), dynamic_rows=(0,))
    FileCheck().check("moe_inductor.permute.default(").check("False)").run(code)
    assert "None, False)" not in code and "masked_select" not in code
    assert compile_and_compare(moe_layer, *layer_inputs(), dynamic_rows=(0,)) == EXPECTED


@pytest.mark.slow
def test_dynamic_true_specializes_the_expert_count_once():
    """dynamic=True also makes E symbolic; the multihot op takes an int, so E is specialized with a guard and T
    stays dynamic: three token counts, one graph, every rewrite applied."""
    from torch._dynamo.utils import counters

    assert compile_and_compare(moe_layer, *layer_inputs(), dynamic=True) == EXPECTED
    compiled = torch.compile(moe_layer, backend="moe_inductor", dynamic=True)
    torch._dynamo.reset()
    counters.clear()
    for tokens in (37, 41, 50):
        compiled(*layer_inputs(tokens))
    assert counters["stats"]["unique_graphs"] == 1


def test_stock_compile_keeps_the_sync_without_our_passes():
    """The baseline the rewrites improve on: Dynamo captures masked_select, and nothing removes it."""
    seen = []

    def capture(gm, example_inputs):
        seen.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        torch.compile(moe_layer, backend=capture)(*layer_inputs())
    assert "masked_select" in seen[0]


def test_backend_is_an_entry_point_and_sets_dynamo_settings_in_a_fresh_process():
    script = (
        "import torch\n"
        "from moe_inductor.testing.eager import megatron_permute_masked_select as p\n"
        "def f(x, m): return p(x, m)[0].sum()\n"
        "x, m = torch.randn(6, 4), torch.rand(6, 3) > 0.5\n"
        "torch.compile(f, backend='moe_inductor')(x, m)\n"
        "import os\n"
        "print(torch._dynamo.config.capture_dynamic_output_shape_ops, torch._dynamo.utils.counters['stats']"
        f"['unique_graphs'], os.environ.get('{STATIC_LAUNCH_ENV}'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != STATIC_LAUNCH_ENV}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env).stdout
    # No import of moe_inductor, settings on, one graph (no break), and the variable that Inductor's compile workers
    # read to launch our kernels statically is set for them.
    assert out.split() == ["True", "1", "1"]


@pytest.mark.parametrize("preset", [None, "0"])
def test_backend_launches_our_kernels_statically_unless_opted_out(monkeypatch, preset):
    from moe_inductor.backends.inductor import static_launch_settings

    if preset is None:
        monkeypatch.delenv(STATIC_LAUNCH_ENV, raising=False)
    else:
        monkeypatch.setenv(STATIC_LAUNCH_ENV, preset)
    got = static_launch_settings()
    if preset == "0":
        assert got == {} and os.environ[STATIC_LAUNCH_ENV] == "0"
    else:
        assert got == {"static_launch_user_defined_triton_kernels": True} and os.environ[STATIC_LAUNCH_ENV] == "1"


def test_backend_options_reach_the_backward_compile():
    """`options` (and `mode`) hold for the backward too, which AOTAutograd compiles at its first run, after the
    backend has returned: a post-grad pass given as an option sees both graphs."""
    from torch._inductor.custom_graph_pass import CustomGraphPass
    from torch._inductor.utils import fresh_cache

    from moe_inductor.backends.inductor import backend

    seen = []

    class Record(CustomGraphPass):
        def __call__(self, graph):
            seen.append(graph)

        def uuid(self):
            return b"record-graphs"

    x = torch.randn(8, requires_grad=True)
    torch._dynamo.reset()
    with fresh_cache():  # a cached graph would skip the passes
        compiled = torch.compile(
            lambda t: (t.sin() * 2).sum(), backend=backend, options={"post_grad_custom_post_pass": Record()}
        )
        compiled(x).backward()
    assert len(seen) == 2  # forward and backward
    torch.testing.assert_close(x.grad, 2 * x.detach().cos())


def test_enable_disable_restore_config(monkeypatch):
    monkeypatch.delenv(STATIC_LAUNCH_ENV, raising=False)  # enable() sets it; monkeypatch restores it afterwards
    config = torch._inductor.config
    before = config.pre_grad_custom_pass
    with config.patch(static_launch_user_defined_triton_kernels=False):
        with moe_inductor.enabled():
            assert config.pre_grad_custom_pass == rewrite_pass()
            assert torch._dynamo.config.capture_dynamic_output_shape_ops
            assert config.static_launch_user_defined_triton_kernels
        assert not config.static_launch_user_defined_triton_kernels
    assert config.pre_grad_custom_pass is before
    with pytest.raises(RuntimeError, match="without a matching enable"):
        moe_inductor.disable()


@pytest.mark.slow
def test_enable_with_stock_inductor_rewrites():
    with moe_inductor.enabled():
        got = compile_and_compare(moe_layer, *layer_inputs(seed=3), backend="inductor")
    assert got == EXPECTED


def test_uuid_covers_enabled_rewrites_and_is_stable():
    everything, some = rewrite_pass(), rewrite_pass(["permute_masked_select"])
    assert everything.uuid() == rewrite_pass().uuid()
    assert everything.uuid() != some.uuid()
    assert isinstance(everything.uuid(), bytes)


def test_only_restricts_the_rewrites():
    code = rewritten_graph(moe_layer, *layer_inputs(), only=["permute_masked_select_probs"])
    assert "indices_to_multihot" not in code and "moe_inductor.permute" in code and "scatter_add" in code
    # Without the multihot rewrite the top-k provenance is not followed: the permute keeps a data-dependent size.
    FileCheck().check("moe_inductor.permute.default(").check("None, False)").run(code)
