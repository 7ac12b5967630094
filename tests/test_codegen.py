"""What Inductor generates for our ops: our Triton kernels inline on CUDA, the reference fused into C++ on CPU.

The ops are decomposed into their bodies under torch.compile (ops/_registry.py), so no opaque
`torch.ops.moe_inductor.*` call may remain in the generated code, except `permute(num_out_tokens=None)` whose row
count is data-dependent and `gmm` on CPU (host loop in the reference), which stay whole on purpose.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

from moe_inductor import ops


def _layer(T=19, E=6, K=2, H=24, device="cpu"):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=g)
    probs, idx = logits.softmax(-1).topk(K, dim=-1)
    x = torch.randn(T, H, generator=g)
    return [t.to(device) for t in (x, idx, probs)], T * K


def _route_and_combine(x, idx, probs, num_out_tokens):
    routing_map, probs_map = ops.indices_to_multihot(idx, probs, 6)
    permuted, permuted_probs, sorted_indices = ops.permute(x, routing_map, probs_map, num_out_tokens=num_out_tokens)
    y = torch.nn.functional.silu(permuted) * permuted_probs.unsqueeze(-1)
    return ops.unpermute(y, sorted_indices, x.shape, probs=probs_map, routing_map=routing_map)


def _compiled_code(device):
    (x, idx, probs), rows = _layer(device=device)
    torch._dynamo.reset()
    fn = torch.compile(_route_and_combine, fullgraph=True)
    out, code = run_and_get_code(fn, x, idx, probs, rows)
    torch.testing.assert_close(out, _route_and_combine(x, idx, probs, rows), rtol=1e-5, atol=1e-5)
    return "\n".join(code)


def test_cpu_reference_is_fused_into_cpp():
    code = _compiled_code("cpu")
    FileCheck().check("cpp_fused").run(code)
    FileCheck().check_not("torch.ops.moe_inductor").run(code)


def test_data_dependent_permute_stays_one_op():
    (x, idx, probs), _ = _layer()
    torch._dynamo.reset()
    fn = torch.compile(_route_and_combine, fullgraph=True)
    _, code = run_and_get_code(fn, x, idx, probs, None)
    FileCheck().check("torch.ops.moe_inductor.permute.default").run("\n".join(code))


@pytest.mark.gpu
def test_cuda_calls_our_triton_kernels_inline():
    code = _compiled_code("cuda")
    # The kernels' sources are copied into the generated module and launched from it, not called as custom ops.
    for name in ("_multihot", "_column_counts", "_scan_chunks", "_pair_rows", "_dispatch", "_combine"):
        assert name in code, f"kernel {name} missing from Inductor's output"
    FileCheck().check_not("torch.ops.moe_inductor").run(code)


_LAUNCHER_SCRIPT = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from test_codegen import _layer, _route_and_combine
(x, idx, probs), rows = _layer(device="cuda")
x.requires_grad_()
torch.compile(_route_and_combine, backend="moe_inductor")(x, idx, probs, rows).sum().backward()
torch.cuda.synchronize()
"""


@pytest.mark.gpu
@pytest.mark.slow
def test_backend_compiles_without_building_triton_launchers(tmp_path):
    """Triton (3.x) builds a C launcher with gcc for each kernel signature it launches itself; Inductor launches
    kernels it compiled through its own cubin launcher. The backend has it launch ours so too
    (`static_launch_settings`), so a cold compile of our ops builds no launcher; opting out builds some."""
    import subprocess
    import sys

    from moe_inductor.backends.inductor import STATIC_LAUNCH_ENV

    def launchers(preset):
        env = {k: v for k, v in os.environ.items() if k != STATIC_LAUNCH_ENV}
        env.update(
            TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor{preset}"),
            TRITON_CACHE_DIR=str(tmp_path / f"triton{preset}"),
        )
        if preset is not None:
            env[STATIC_LAUNCH_ENV] = preset
        subprocess.run([sys.executable, "-c", _LAUNCHER_SCRIPT], env=env, check=True, timeout=600)
        return sorted(p.name for p in (tmp_path / f"triton{preset}").rglob("*launcher*.so"))

    triton_launched = launchers("0")
    if not triton_launched:
        pytest.skip("this Triton builds no per-signature launcher")
    assert launchers(None) == [], "our kernels were launched through Triton's launcher"
