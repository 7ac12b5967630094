"""gmm on CUDA: our Triton kernels and the torch._grouped_mm dispatch against a float64 loop at real sizes, gradients,
and what torch.compile generates (our kernel inline by default; the grouped-GEMM template with the following
pointwise ops fused under max-autotune). Skipped without a GPU (CI); run through the device tool.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

from moe_inductor import ops

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _counts(G, rows_per_group, seed, skew=False):
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(G, generator=g) + 0.2
    if skew:
        weights[:2] *= 50
    counts = (weights / weights.sum() * G * rows_per_group).long()
    counts[G // 3] = 0  # an empty group
    counts[G // 2] = 1  # a one-row group
    return counts


def _loop(x, w, bias, counts, group_type):
    """float64 per-group loop on the GPU."""
    x64, w64 = x.double(), w.double()
    ends = list(itertools.accumulate(counts.tolist()))
    start = 0
    if group_type == 0:
        out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64, device=x.device)
        for g, end in enumerate(ends):
            out[start:end] = x64[start:end] @ w64[g] + (bias[g].double() if bias is not None else 0)
            start = end
        return out
    out = torch.zeros(len(ends), x.shape[0], w.shape[1], dtype=torch.float64, device=x.device)
    for g, end in enumerate(ends):
        out[g] = x64[:, start:end] @ w64[start:end]
        start = end
    return out


def _assert_close(actual, expected, dtype):
    assert actual.shape == expected.shape
    if expected.numel() == 0:
        return
    scale = expected.abs().max().item() or 1.0
    err = (actual.double() - expected).abs().max().item()
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} vs max |ref| {scale:.3g}"


@pytest.fixture(params=["dispatch", "triton", "triton-pointers"])
def path(request, monkeypatch):
    """Each test runs as users get it (bf16 on sm90 -> torch._grouped_mm), with our Triton kernel forced (TMA loads
    on sm90 where the layout allows, or pointer loads where the autotuner prefers them), and with our kernel's pointer
    loads alone."""
    if request.param != "dispatch":
        monkeypatch.setenv("MOE_INDUCTOR_GMM", "triton")
    if request.param == "triton-pointers":
        monkeypatch.setenv("MOE_INDUCTOR_GMM_TMA", "0")
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "G,rows,K,N,skew,transposed",
    [
        (32, 517, 1024, 768, False, False),  # ~128..1024-row groups, M not a tile multiple
        (8, 1000, 4096, 1000, True, True),  # skewed, transposed weight view, N not a tile multiple
        (128, 37, 2048, 1536, False, False),  # many small groups
    ],
)
def test_split_m_and_gradients(path, dtype, G, rows, K, N, skew, transposed):
    torch.manual_seed(0)
    counts = _counts(G, rows, seed=G, skew=skew).cuda()
    M = int(counts.sum()) + 13  # rows past the last group
    x = (torch.randn(M, K, device="cuda") * 0.5).to(dtype).requires_grad_()
    w = torch.randn(G, N, K, device="cuda").transpose(1, 2) if transposed else torch.randn(G, K, N, device="cuda")
    w = (w / K**0.5).to(dtype).requires_grad_()
    bias = torch.randn(G, N, device="cuda").requires_grad_() if dtype == torch.bfloat16 else None
    y = ops.gmm_v2(x, w, bias=bias, group_list=counts)
    ends = counts.cumsum(0)
    y_cum = ops.gmm(x, w, bias=bias, group_list=ends)
    _assert_close(y.detach(), _loop(x.detach(), w.detach(), bias, counts, 0), dtype)
    assert torch.equal(y, y_cum)
    assert not y[-13:].any()
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for t in (x, w, bias) if t is not None], dy)
    dx, dw = grads[0], grads[1]
    start = 0
    for g, n in enumerate(counts.tolist()):
        rows_g = slice(start, start + n)
        ref_dx = dy[rows_g].double() @ w[g].detach().double().T
        _assert_close(dx[rows_g], ref_dx, dtype)
        _assert_close(dw[g], x[rows_g].detach().double().T @ dy[rows_g].double(), dtype)
        if bias is not None:
            _assert_close(grads[2][g], dy[rows_g].double().sum(0), dtype)
        start += n
    assert not dx[start:].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_split_k(path, dtype):
    counts = _counts(16, 300, seed=3).cuda()
    x_rows = torch.randn(int(counts.sum()) + 5, 640, device="cuda").to(dtype)
    x = x_rows.t()  # [640, tokens], as the weight gradient passes it
    dy = torch.randn(x_rows.shape[0], 1000, device="cuda").to(dtype)
    y = ops.gmm_v2(x, dy, group_list=counts, group_type=2)
    _assert_close(y, _loop(x, dy, None, counts, 2), dtype)
    assert not y[int((counts == 0).nonzero()[0])].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_split_k_candidate(dtype, monkeypatch):
    """Each autotuning candidate of split K on its own (the autotuner runs only the fastest): TMA and pointer loads,
    TMA stores whole and in column halves, a partial column tile (N = 1000) that the TMA store clips."""
    import triton

    from moe_inductor.kernels import grouped_matmul as kernels

    monkeypatch.setenv("MOE_INDUCTOR_GMM", "triton")
    counts = _counts(16, 300, seed=4).cuda()
    x_rows = torch.randn(int(counts.sum()) + 5, 640, device="cuda").to(dtype)
    dy = torch.randn(x_rows.shape[0], 1000, device="cuda").to(dtype)
    assert kernels._tma_layout(x_rows.t(), dy, 2) is not None
    expected = _loop(x_rows.t(), dy, None, counts, 2)
    candidates = kernels._configs(False, dtype == torch.float32, True)
    ran = []
    try:
        for config in candidates:
            monkeypatch.setattr(kernels, "_configs", lambda *args, config=config: [config])
            kernels._kernel.cache_clear()
            try:
                y = ops.gmm_v2(x_rows.t(), dy, group_list=counts, group_type=2)
            except triton.runtime.errors.OutOfResources:
                continue  # too much shared memory for this dtype: the autotuner skips it the same way
            _assert_close(y, expected, dtype)
            ran.append(config.kwargs)
    finally:
        kernels._kernel.cache_clear()
    assert any(c["STORE_TMA"] and c["STORE_SPLIT"] == 2 for c in ran), ran
    assert any(not c["STORE_TMA"] for c in ran), ran


def test_large_offsets(path):
    """Weight offsets past 2**31 elements: 3 groups of 32768 x 32768 (bf16, 6 GiB), the last group's rows used."""
    G, K, N = 3, 32768, 32768
    assert (G - 1) * K * N > 2**31 - 1  # the last group starts past int32
    w = torch.empty(G, K, N, device="cuda", dtype=torch.bfloat16)
    w[-1].normal_()
    x = torch.randn(64, K, device="cuda", dtype=torch.bfloat16)
    counts = torch.tensor([0, 0, 64], device="cuda")
    y = ops.gmm_v2(x, w, group_list=counts)
    _assert_close(y[:, :256], x.double() @ w[-1, :, :256].double(), torch.bfloat16)
    del w, y
    # Split K: the output [G, M, N] of the last group starts past int32 as well.
    a, b = torch.randn(K, 64, device="cuda", dtype=torch.bfloat16), torch.randn(64, N, device="cuda").bfloat16()
    y = ops.gmm_v2(a, b, group_list=counts, group_type=2)
    assert not y[0].any() and not y[1].any()
    _assert_close(y[2, -256:, -256:], a[-256:].double() @ b[:, -256:].double(), torch.bfloat16)


def _expert_mlp(x, w_gate, w_up, counts, probs):
    gate = ops.gmm_v2(x, w_gate, group_list=counts)
    up = ops.gmm_v2(x, w_up, group_list=counts)
    return torch.nn.functional.silu(gate) * up * probs.unsqueeze(-1)


def _mlp_inputs(dtype):
    torch.manual_seed(0)
    G, K, N = 8, 512, 384
    counts = _counts(G, 300, seed=1).cuda()
    M = int(counts.sum())
    x = (torch.randn(M, K, device="cuda") * 0.5).to(dtype)
    w_gate = (torch.randn(G, K, N, device="cuda") / K**0.5).to(dtype)
    w_up = (torch.randn(G, K, N, device="cuda") / K**0.5).to(dtype)
    return x, w_gate, w_up, counts, torch.rand(M, device="cuda").to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_calls_our_triton_kernel_inline(dtype, monkeypatch):
    if dtype == torch.bfloat16:  # bf16 groups this small run our kernel too, outside max-autotune
        monkeypatch.setattr("moe_inductor.kernels.grouped_matmul.SMALL_GROUP_ROWS", 10**6)
    args = _mlp_inputs(dtype)
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(_expert_mlp, fullgraph=True), *args)
    _assert_close(out, _expert_mlp(*args).double(), dtype)
    code = "\n".join(code)
    FileCheck().check("_split_m_kernel").run(code)
    FileCheck().check_not("torch.ops.moe_inductor").run(code)


def test_max_autotune_fuses_the_epilogue_into_the_grouped_gemm():
    """bf16 on sm90: gmm becomes aten._grouped_mm, Inductor's grouped-GEMM template, and SiLU-and-mul and the scale
    by probs are computed in the second GEMM's epilogue (no separate pointwise kernel for them)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("torch._grouped_mm dispatch is for sm90")
    args = _mlp_inputs(torch.bfloat16)
    torch._dynamo.reset()
    options = {"max_autotune": True, "max_autotune_gemm_backends": "TRITON"}
    fn = torch.compile(_expert_mlp, fullgraph=True, options=options)
    out, code = run_and_get_code(fn, *args)
    _assert_close(out, _expert_mlp(*args).double(), torch.bfloat16)
    code = "\n".join(code)
    kernels = [line for line in code.splitlines() if line.startswith("def triton_")]
    assert any(k.startswith("def triton_tem_fused") and "mul" in k for k in kernels), kernels
    assert not any(k.startswith("def triton_poi") and "mul" in k for k in kernels), kernels


_FRESH_PROCESS_STEP = """
import os, sys, torch
os.environ["MOE_INDUCTOR_GMM"] = "triton"
from moe_inductor import ops
from moe_inductor.reference.grouped_matmul import gmm as reference
torch.manual_seed(0)
counts = torch.tensor([300, 0, 1, 130, 310, 280, 125, 299], device="cuda")
x = (torch.randn(int(counts.sum()) + 7, 512, device="cuda") * 0.5).bfloat16().requires_grad_()
w = (torch.randn(8, 512, 384, device="cuda") / 512**0.5).bfloat16().requires_grad_()
def f(gmm, x, w):
    return torch.nn.functional.silu(gmm(x, w)) * 2
ours = torch.compile(lambda x, w: f(lambda a, b: ops.gmm_v2(a, b, group_list=counts), x, w), backend=sys.argv[1])
y = ours(x, w)
dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
y32 = f(lambda a, b: reference(a, b, None, counts.cpu(), 0, False), x32, w32)
ex, ew = torch.autograd.grad(y32, (x32, w32), torch.ones_like(y32))
for a, e in ((y, y32), (dx, ex), (dw, ew)):
    err = (a.float() - e).abs().max().item()
    assert err <= 2e-2 * e.abs().max().item(), err
"""


@pytest.mark.parametrize("backend", ["inductor", "aot_eager", "moe_inductor"])
def test_compiled_backward_in_a_fresh_process(backend):
    """Forward and backward compiled with our kernels forced, in a process where no eager gmm ran before: the TMA
    descriptors our kernels make on the device need Triton's allocator in the thread that launches them, and autograd
    runs the backward in a thread of its own (Inductor sets the allocator before its launches; our pre-run hook does
    for launches through the kernel itself, as aot_eager's). With the moe_inductor backend Inductor launches user
    kernels statically, except these (global scratch), which must fall back to Triton's launcher."""
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS_STEP, backend], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_gradcheck_float64():
    counts = torch.tensor([3, 0, 4, 1], device="cuda")
    x = torch.randn(9, 5, device="cuda", dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 6, device="cuda", dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 6, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.gmm_v2(a, b, bias=c, group_list=counts), (x, w, bias))
