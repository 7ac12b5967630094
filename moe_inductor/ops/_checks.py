"""Argument validation shared by every op.

Two kinds of checks, kept apart on purpose:

* Metadata checks (dtype, rank, shapes, Python ints) run in the real kernel *and* in the fake kernel, so a bad call
  fails the same way in eager mode and while `torch.compile` traces. Shapes may be symbolic there: `check()`
  accepts a SymBool and turns it into a guard, or into a deferred runtime assert when the value is data-dependent.
* Data checks (ids out of range, malformed group lists, ...) read tensor values, which on an accelerator costs a host
  sync. They run only for CPU tensors (`on_cpu`); accelerator kernels skip invalid entries instead of writing them.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.fx.experimental.symbolic_shapes import guard_or_true

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
ROUTING_MAP_DTYPES = (torch.bool, torch.int8, torch.uint8)


def check(cond, message: str, exc: type = ValueError) -> None:
    """Raise `exc(message)` unless `cond` holds; `cond` may be a SymBool."""
    if isinstance(cond, torch.SymBool):
        if not guard_or_true(cond):
            raise exc(message)
        # Data-dependent (unbacked) condition: becomes a runtime assert in the compiled graph.
        torch._check(cond, lambda: message)
    elif not cond:
        raise exc(message)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    t: torch.Tensor,
    *,
    ndim: Optional[int | tuple[int, ...]] = None,
    dtypes: Optional[tuple[torch.dtype, ...]] = None,
) -> None:
    """Type, rank and dtype of one tensor argument; the error names the op and the argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        check(
            t.dim() in allowed,
            f"{op}: '{name}' must be {' or '.join(f'{d}-D' for d in allowed)}, got shape {tuple(t.shape)}",
        )
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: '{name}' must have dtype in ({_dtype_names(dtypes)}), got {t.dtype}")


def check_shape(op: str, name: str, t: torch.Tensor, expected: tuple, what: str = "") -> None:
    """`t.shape == expected` (entries may be SymInts); `what` explains where `expected` comes from."""
    suffix = f" ({what})" if what else ""
    message = f"{op}: '{name}' must have shape {tuple(expected)}{suffix}, got {tuple(t.shape)}"
    check(t.dim() == len(expected), message)
    for actual, want in zip(t.shape, expected, strict=True):
        check(actual == want, message)


def check_same_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"'{k}' on {v.device}" for k, v in present.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}")


def on_cpu(t: torch.Tensor) -> bool:
    """Whether data checks may read `t`: a real CPU tensor (no device sync), not one being traced by torch.compile
    (a compiled graph skips invalid entries like the accelerator kernels do)."""
    return t.device.type == "cpu" and not is_fake(t) and not isinstance(t, FunctionalTensor)
