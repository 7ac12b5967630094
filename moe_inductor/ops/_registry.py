"""The one place that turns a schema into a `torch.library` custom op in the `moe_inductor` namespace.

Schemas are written out rather than inferred from type hints so that sizes that can come from tensor shapes are
`SymInt` (they stay symbolic under `torch.compile(dynamic=True)`) while modes and flags are plain `int`/`bool`
(a change of mode is a new graph, not a guard on a symbol).

Each op's Python body validates its arguments and then calls the kernels of the input's device: `backend(t)` is
`moe_inductor.kernels` (Triton) for CUDA tensors, the package a device backend registered in `DEVICE_KERNELS` (the
Ascend NPU: `moe_inductor.backends.npu`), and `moe_inductor.reference` (plain torch) elsewhere. The same body serves
three callers:

* eager calls: Triton kernels are launched directly; a plain call skips the dispatcher (`Op`, the eager fast path),
  others reach the body as the op's CompositeExplicitAutograd kernel;
* `torch.compile`: AOTAutograd decomposes the op into its body (as `torch.library.triton_op` does), so Inductor
  sees our Triton kernels (wrapped by `wrap_triton`) on CUDA and emits their launches into its generated code, and
  sees the plain-torch reference on CPU and fuses it into its own C++ kernels. Data checks that read values are
  skipped while tracing (`_checks.on_cpu`). An op whose output size is data-dependent stays opaque (`traceable`),
  and so does an op that a device package lists in its `WHOLE_OPS` (its graph compiler maps the op itself).
* the fake kernel registered by each op module (shapes only).

We do not use `triton_op` itself: it infers the schema from type hints (no `SymInt` vs `int` control) and installs
the body as the fake kernel, which our explicit fake kernels would have to override (only 2.13 allows that).
"""

from __future__ import annotations

import contextlib
import functools
import os
from types import ModuleType
from typing import Callable, Optional

import torch
from torch._library.custom_ops import CustomOpDef
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.utils._python_dispatch import _get_current_dispatch_mode

NAMESPACE = "moe_inductor"

#: Every op defined by the package, by name, in definition order.
OPS: dict[str, CustomOpDef] = {}
#: The same ops as called by the public functions (`Op`: the custom op plus its eager fast path).
EAGER_OPS: dict[str, "Op"] = {}

#: Set MOE_INDUCTOR_KERNELS=reference to run the plain-torch reference on CUDA too (benchmarks, debugging).
_FORCE_REFERENCE = os.environ.get("MOE_INDUCTOR_KERNELS", "").lower() == "reference"


#: Kernel packages of other devices, by device type, added by their backend's `install()` (e.g. "npu"). A package has
#: the family modules of `moe_inductor.reference` and `WHOLE_OPS`, the names of the ops torch.compile keeps whole on
#: that device.
DEVICE_KERNELS: dict[str, ModuleType] = {}


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels handle tensors on `t`'s device."""
    return t.device.type == "cuda" and not _FORCE_REFERENCE


def backend(t: torch.Tensor):
    """The kernel package for `t`'s device: `moe_inductor.kernels` on CUDA, a registered `DEVICE_KERNELS` package,
    `moe_inductor.reference` elsewhere.

    All expose the same functions with the same signatures (one module per op family), so an op body reads
    `backend(x).permutation.permute(...)` whatever the device.
    """
    device_kernels = DEVICE_KERNELS.get(t.device.type)
    if device_kernels is not None:
        return device_kernels
    if use_triton(t):
        from .. import kernels

        return kernels
    from .. import reference

    return reference


def _wrap_triton_disabled():
    """Eager calls launch Triton kernels directly instead of through the traceable `wrap_triton` HOP."""
    setter = getattr(torch._library.triton, "set_wrap_triton_enabled", None)
    return setter(False) if setter is not None else contextlib.nullcontext()


def _decomposition_disabled() -> bool:
    """torch.export keeps custom ops whole (what it does for triton_op too)."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:  # pragma: no cover - older torch
        return False
    return custom_triton_ops_decomposition_disabled()


def _kept_whole(name: str, args) -> bool:
    """Whether the device package of this call keeps the op whole under torch.compile, so that the device's graph
    compiler (torchair) finds it in the graph and maps it to a native op."""
    for a in args:
        if isinstance(a, torch.Tensor):  # all tensor arguments share one device (validated by every op)
            device_kernels = DEVICE_KERNELS.get(a.device.type)
            return device_kernels is not None and name in device_kernels.WHOLE_OPS
    return False


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_FAST_DEVICES = ("cuda", "cpu")


def _plain_eager(args) -> bool:
    """Whether a call may skip the dispatcher: plain CPU/CUDA tensors, and nothing that must see the op itself
    (a torch function or dispatch mode, functorch transforms, TorchScript tracing; Dynamo is checked by the caller)."""
    if (
        torch._C._is_torch_function_mode_enabled()
        or _get_current_dispatch_mode() is not None
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch._C._get_tracing_state() is not None
    ):
        return False
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN_TENSORS or a.device.type not in _FAST_DEVICES or a.layout != torch.strided:
                return False
        elif isinstance(a, (list, tuple)):
            if any(not isinstance(e, int) for e in a):
                return False
        elif a is not None and not isinstance(a, (int, float, bool)):  # SymInt and the like: traced, not eager
            return False
    return True


class Op:
    """A `moe_inductor` custom op (`custom_op`, a `CustomOpDef`) with an eager fast path.

    Why: at small batches an eager call is host-bound, and the dispatcher with `torch.library`'s autograd wrapper adds
    15-45 us to it (H200 host, decode shape: permute 201 us per call through the dispatcher, 170 directly; see
    `benchmarks/host.py`). A call on plain CPU/CUDA tensors outside any tracing or mode (`_plain_eager`) runs the
    same body directly, through an `autograd.Function` made of the same backward and setup_context when a gradient
    is needed. Everything else
    (torch.compile, export, fake tensors, functorch, subclasses, NPU tensors) goes through the op, so graphs still
    see `torch.ops.moe_inductor.*`. The profiler sees the fast path as a range of the op's name.
    """

    def __init__(self, custom_op: CustomOpDef, body: Callable, name: str):
        self.custom_op, self._body, self._name = custom_op, body, name
        self._function: Optional[type[torch.autograd.Function]] = None

    def register_fake(self, fn: Callable) -> Callable:
        return self.custom_op.register_fake(fn)

    def register_autograd(self, backward: Callable, *, setup_context: Optional[Callable] = None) -> None:
        self.custom_op.register_autograd(backward, setup_context=setup_context)
        body = self._body

        def forward(ctx, *args):
            output = body(*args)
            if setup_context is not None:
                setup_context(ctx=ctx, inputs=args, output=output)
            return output

        self._function = type(
            f"{self._name}_eager",
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)},
        )

    def __call__(self, *args):
        if torch.compiler.is_compiling() or not _plain_eager(args):
            return self.custom_op(*args)
        needs_grad = torch.is_grad_enabled() and torch._C._any_requires_grad(*args)
        if needs_grad and self._function is None:
            return self.custom_op(*args)  # raises torch.library's "no autograd formula" error
        run = self._function.apply if needs_grad else self._body
        if torch._C._autograd._profiler_enabled():
            with torch.profiler.record_function(f"{NAMESPACE}::{self._name}"):
                return run(*args)
        return run(*args)

    def __repr__(self) -> str:
        return f"Op({NAMESPACE}::{self._name})"


def define(schema: str, *, traceable: Optional[Callable[..., bool]] = None) -> Callable[[Callable], Op]:
    """Decorator: `@define("name(Tensor x, ...) -> Tensor")` over the op's body.

    `traceable(*args)` says whether `torch.compile` may decompose a call into the body; None means always, and
    `lambda *a: False` keeps the op opaque (its body then runs at run time, kernels included).
    Returns an `Op`: call it with every argument positionally; `register_fake` / `register_autograd` as on a
    `CustomOpDef` (its `custom_op`, also in `OPS`).
    """
    name, _, signature = schema.partition("(")
    signature = "(" + signature

    def decorate(fn: Callable) -> Op:
        @functools.wraps(fn)
        def eager(*args):
            with _wrap_triton_disabled():
                return fn(*args)

        op = torch.library.custom_op(f"{NAMESPACE}::{name}", eager, mutates_args=(), schema=signature)

        def decompose(mode, func, types, args, kwargs):
            known = (torch.Tensor, FunctionalTensor, torch._subclasses.FakeTensor)
            if any(not issubclass(t, known) for t in types):
                return NotImplemented
            if (
                _decomposition_disabled()
                or _kept_whole(name, args)
                or (traceable is not None and not traceable(*args, **kwargs))
            ):
                return mode.__torch_dispatch__(func, types, args, kwargs)
            with mode:
                return fn(*args, **kwargs)

        op.register_torch_dispatch(FunctionalTensorMode, decompose)
        OPS[name] = op
        EAGER_OPS[name] = Op(op, eager, name)
        return EAGER_OPS[name]

    return decorate
