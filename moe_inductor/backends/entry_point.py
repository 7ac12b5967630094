"""Target of the `torch_dynamo_backends` entry point `moe_inductor` (pyproject.toml).

Dynamo imports this module when it first resolves `backend="moe_inductor"`, before it traces anything: the one
moment a named backend can still change how Dynamo traces. Importing it turns on the Dynamo settings the rewrites
need (see `inductor.py`) and sets the variable that has Inductor launch our kernels statically. Nothing else
imports this module.
"""

import torch

from .inductor import DYNAMO_SETTINGS, backend, static_launch_settings

for _name, _value in DYNAMO_SETTINGS.items():
    setattr(torch._dynamo.config, _name, _value)
# Also as early as possible: Inductor's compile workers read it from the environment when they start.
static_launch_settings()

__all__ = ["backend"]
