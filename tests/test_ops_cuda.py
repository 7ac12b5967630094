"""The ops on CUDA tensors: same results as on CPU, eager and under torch.compile. Skipped without a GPU.

Until device kernels are registered, CUDA runs the reference (the ops' default kernel); these tests then pin down
that the reference is device-agnostic and that the fake kernels hold on CUDA. Device kernels must keep them green.
"""

from __future__ import annotations

import pytest
import torch

from moe_inductor.ops import OPS
from moe_inductor.ops._registry import EAGER_OPS
from samples import all_samples, run_with_grads

pytestmark = pytest.mark.gpu

ALL = list(all_samples())


def _to(args, device):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = a.detach().to(device).requires_grad_(a.requires_grad)
        out.append(a)
    return tuple(out)


def _compare(cuda, cpu):
    (outs_c, grads_c), (outs_h, grads_h) = cuda, cpu
    for a, e in zip(outs_c, outs_h, strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a.cpu(), e, rtol=1e-4, atol=1e-4)
        else:
            assert torch.equal(a.cpu(), e)
    for a, e in zip(grads_c, grads_h, strict=True):
        if e is None:
            assert a is None
        else:
            torch.testing.assert_close(a.cpu(), e, rtol=1e-4, atol=1e-4)


# Eager calls through the dispatcher (the op) and through the fast path (`Op`, what the public functions call).
PATHS = pytest.mark.parametrize("path", [OPS, EAGER_OPS], ids=["dispatcher", "fast"])


@PATHS
@pytest.mark.parametrize("op_name,sample", ALL, ids=[f"{op}-{s.name}" for op, s in ALL])
def test_cuda_matches_cpu(op_name, sample, path):
    op = path[op_name]
    _compare(run_with_grads(op, _to(sample.args, "cuda")), run_with_grads(op, _to(sample.args, "cpu")))


COMPILE = [(op, s) for op, s in all_samples(compile_only=True)]


@pytest.mark.parametrize("op_name,sample", COMPILE, ids=[f"{op}-{s.name}" for op, s in COMPILE])
@pytest.mark.parametrize("dynamic", [False, True])
def test_cuda_compiled_matches_cpu(op_name, sample, dynamic):
    op = OPS[op_name]
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True, dynamic=dynamic)
    _compare(run_with_grads(compiled, _to(sample.args, "cuda")), run_with_grads(op, _to(sample.args, "cpu")))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@PATHS
@pytest.mark.parametrize("op_name,sample", ALL, ids=[f"{op}-{s.name}" for op, s in ALL])
def test_second_gpu_while_the_first_is_current(op_name, sample, path):
    """Triton launches on the current device: the ops must switch to their tensors' device (and stream)."""
    op = path[op_name]
    with torch.cuda.device(0):
        on_second = run_with_grads(op, _to(sample.args, "cuda:1"))
        torch.cuda.synchronize(1)
    for t in on_second[0]:
        assert t.device == torch.device("cuda", 1)
    _compare(on_second, run_with_grads(op, _to(sample.args, "cpu")))
