"""Checks every op passes, driven by `samples.py`: opcheck, gradcheck, torch.compile vs eager."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import moe_inductor  # noqa: F401  (registers the ops)
from moe_inductor.ops import OPS
from samples import BUILDERS, all_samples, clone_args, to_float64

ALL = list(all_samples())
IDS = [f"{op}-{s.name}" for op, s in ALL]


def _differentiable(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _float_outputs(out):
    out = out if isinstance(out, tuple) else (out,)
    return [o for o in out if o.is_floating_point()]


def test_every_op_has_samples():
    assert set(BUILDERS) == set(OPS), "each registered op needs samples in tests/samples.py"
    for op, build in BUILDERS.items():
        assert len(build()) >= 3, op


@pytest.mark.parametrize("op_name,sample", ALL, ids=IDS)
def test_opcheck(op_name, sample):
    opcheck(OPS[op_name], clone_args(sample.args))


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other element of a buffer twice as long)."""
    if t.dim() == 0 or t.numel() == 0:
        return t
    buffer = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
    out = buffer[..., ::2]
    out.copy_(t.detach())
    assert t.shape[-1] == 1 or not out.is_contiguous()  # a last dim of one is contiguous at any stride
    return out.requires_grad_(t.requires_grad) if t.is_floating_point() else out


@pytest.mark.parametrize("op_name,sample", ALL, ids=IDS)
def test_non_contiguous_inputs(op_name, sample):
    op = OPS[op_name]
    expected = op(*clone_args(sample.args))
    actual = op(*(_strided(a) if isinstance(a, torch.Tensor) else a for a in sample.args))
    torch.testing.assert_close(actual, expected)  # matmuls may round differently per layout; indices must match


GRAD = [(op, s) for op, s in ALL if _differentiable(s.args)]


@pytest.mark.parametrize("op_name,sample", GRAD, ids=[f"{op}-{s.name}" for op, s in GRAD])
def test_gradcheck_float64(op_name, sample):
    op = OPS[op_name]
    args = to_float64(sample.args)

    def fn(*a):
        return tuple(_float_outputs(op(*a)))

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, check_undefined_grad=False)


COMPILE = [(op, s, dyn) for op, s in all_samples(compile_only=True) for dyn in (False, True)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "op_name,sample,dynamic", COMPILE, ids=[f"{op}-{s.name}-{'dynamic' if d else 'static'}" for op, s, d in COMPILE]
)
def test_compiled_matches_eager(op_name, sample, dynamic):
    """fullgraph torch.compile (Inductor, CPU) of the op, forward and backward, equals eager."""
    op = OPS[op_name]
    torch._dynamo.reset()

    def run(fn):
        args = clone_args(sample.args)
        out = fn(*args)
        inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        grads = []
        floats = [o for o in _float_outputs(out) if o.requires_grad]
        if inputs and floats:
            gen = torch.Generator().manual_seed(0)
            loss = sum((o * torch.randn(o.shape, generator=gen).to(o.dtype)).sum() for o in floats)
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        return out, grads

    expected, expected_grads = run(op)
    actual, actual_grads = run(torch.compile(lambda *a: op(*a), fullgraph=True, dynamic=dynamic))
    # Inductor fuses the reference (CPU) and may reorder float sums: float outputs to rounding, integers exactly.
    torch.testing.assert_close(actual, expected)
    for a, e in zip(actual_grads, expected_grads, strict=True):
        if e is None:
            assert a is None
        else:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
