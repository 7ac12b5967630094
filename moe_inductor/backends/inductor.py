"""`moe_inductor.enable()` / `disable()` / `enabled()` and the `torch.compile(backend="moe_inductor")` backend.

Both install `moe_inductor.patterns.rewrite_pass()` as Inductor's `pre_grad_custom_pass` (chained after any pass
already there) and turn on the two Dynamo settings the rewrites need: `capture_dynamic_output_shape_ops` and
`capture_scalar_outputs`, so that `masked_select`/`nonzero`/`repeat_interleave` land in the graph (where the rewrites
replace them) instead of breaking it. Both also have Inductor launch our Triton kernels the way it launches its own
(`static_launch_settings()`), which keeps a cold compile from building a C launcher per kernel signature.

Dynamo reads those settings while it traces, before any backend is called, and `torch.compile` gives a backend named
by string no hook around tracing. So the backend turns them on when Dynamo resolves the name "moe_inductor" (the
first `torch.compile(..., backend="moe_inductor")` of the process; see `entry_point.py`), and they stay on.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

DYNAMO_SETTINGS = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}
STATIC_LAUNCH_ENV = "TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS"

_saved: list[dict[str, Any]] = []  # what enable() replaced, for disable()


class _Chained(CustomGraphPass):
    """Runs a pass that was installed before ours, then ours (torch 2.11 takes one callable per hook)."""

    def __init__(self, first: Any, second: CustomGraphPass) -> None:
        self.first, self.second = first, second

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.first(graph)
        self.second(graph)

    def uuid(self) -> Any:
        first = self.first.uuid() if hasattr(self.first, "uuid") else None
        return (first, self.second.uuid())


def _with_rewrites(current: Any, rewrites: CustomGraphPass) -> Any:
    if current is None:
        return rewrites
    if isinstance(current, list):  # torch 2.13 accepts a list of passes
        return [*current, rewrites]
    return _Chained(current, rewrites)


def inductor_settings(only=None) -> dict[str, Any]:
    """Inductor config entries that install the rewrites (on top of what is configured now)."""
    from ..patterns import rewrite_pass

    return {"pre_grad_custom_pass": _with_rewrites(torch._inductor.config.pre_grad_custom_pass, rewrite_pass(only))}


def static_launch_settings() -> dict[str, Any]:
    """Inductor config that launches user-defined Triton kernels (ours, in compiled code) through Inductor's own
    cubin launcher instead of Triton's.

    Why: Triton 3.6 builds a C launcher with gcc for every kernel signature it launches; a cold compile of the
    Megatron-style layer built 11 (about 2.3 s on the H200, a third of the compile). Inductor launches its own kernels
    without them; this setting extends that to ours (a kernel it cannot launch so, e.g. one needing global scratch,
    falls back to Triton's launcher).

    The decision is made where a kernel is compiled, in Inductor's compile worker processes, which read the setting
    from the environment when they start; so besides the config entry (used when compiling in this process), the
    variable is set in `os.environ` if unset (when Dynamo resolves the backend name, at `enable()` and at each backend
    call). That is a process-wide side effect: it reaches later compiles of other user-defined Triton kernels too.
    Workers started before it (by an earlier stock compile in the process) keep launching ours through Triton: set the
    variable to 1 yourself at the start to have it there too, or to 0 to opt out.
    """
    config = torch._inductor.config
    if not hasattr(config, "static_launch_user_defined_triton_kernels") or os.environ.get(STATIC_LAUNCH_ENV) == "0":
        return {}
    os.environ.setdefault(STATIC_LAUNCH_ENV, "1")
    return {"static_launch_user_defined_triton_kernels": True}


def enable(only=None) -> None:
    """Install the rewrites into Inductor for every later `torch.compile` (stock backend included).

    `only` names the rewrites to use (default: all; see `moe_inductor.patterns`). Calls nest with `disable()`.
    """
    inductor = {**inductor_settings(only), **static_launch_settings()}
    saved = {"inductor": {name: getattr(torch._inductor.config, name) for name in inductor}}
    saved.update({name: getattr(torch._dynamo.config, name) for name in DYNAMO_SETTINGS})
    _saved.append(saved)
    for name, value in inductor.items():
        setattr(torch._inductor.config, name, value)
    for name, value in DYNAMO_SETTINGS.items():
        setattr(torch._dynamo.config, name, value)


def disable() -> None:
    """Undo the latest `enable()`."""
    if not _saved:
        raise RuntimeError("moe_inductor.disable() without a matching enable()")
    saved = _saved.pop()
    for name, value in saved.pop("inductor").items():
        setattr(torch._inductor.config, name, value)
    for name, value in saved.items():
        setattr(torch._dynamo.config, name, value)


@contextlib.contextmanager
def enabled(only=None):
    """`with moe_inductor.enabled(): torch.compile(model)(...)` -- the rewrites for the compiles inside the block."""
    enable(only)
    try:
        yield
    finally:
        disable()


class MoEInductorBackend:
    """Inductor with the rewrites installed for this compile only; `mode`/`options` as for the inductor backend."""

    compiler_name = "moe_inductor"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, *, mode: Optional[str] = None, options=None):
        from torch._inductor import async_compile
        from torch._inductor.compile_fx import compile_fx

        # First, so that an explicit entry in `options` wins for compiles in this process (the compile workers follow
        # the environment variable, see static_launch_settings).
        patches = static_launch_settings()
        # Start Inductor's compile workers now, as the stock backend does, and after the line above: they inherit the
        # environment at start. (Absent in some torch versions; the workers then start at the first kernel compile.)
        getattr(async_compile, "maybe_warm_pool", lambda: None)()
        patches.update(torch._inductor.list_mode_options(mode) if mode else {})
        patches.update(options or {})
        patches.update(inductor_settings())
        # As config_patches, not a `with` around the call: AOTAutograd compiles the backward at its first run, after
        # this call has returned, and the patches (the user's mode and options included) must hold for it too.
        return compile_fx(gm, example_inputs, config_patches=patches)

    def backend_ctx_ctor(self):  # used by torch._dynamo.optimize(backend) (torch.compile drops it)
        return torch._dynamo.config.patch(DYNAMO_SETTINGS)


backend = MoEInductorBackend()
