"""moe_inductor: Mixture-of-Experts routing ops for torch.compile.

`import moe_inductor` registers the ops (cheap: no compilation, no GPU needed); call them as
`moe_inductor.ops.<name>(...)` or `torch.ops.moe_inductor.<name>(...)`. `moe_inductor.enable()` (or
`torch.compile(model, backend="moe_inductor")`) rewrites existing eager MoE routing code into these ops.
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402  (registers the ops)
from .backends.inductor import disable, enable, enabled  # noqa: E402
from .backends.npu import install as _install_npu  # noqa: E402
from .replay import RouterReplay, RouterReplayAction  # noqa: E402

_install_npu()  # Ascend NPU: our ops call torch_npu's kernels; a no-op without torch_npu

__all__ = ["RouterReplay", "RouterReplayAction", "__version__", "disable", "enable", "enabled", "ops"]
