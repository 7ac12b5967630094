"""moe_inductor: Mixture-of-Experts routing ops for torch.compile.

`import moe_inductor` registers the ops (cheap: no compilation, no GPU needed); call them as
`moe_inductor.ops.<name>(...)` or `torch.ops.moe_inductor.<name>(...)`.
"""

from . import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
