"""Pattern-matcher rewrites: eager MoE routing code -> our ops. One module per eager family.

`FAMILIES` is the order they run in: multihot first, so that permute sees `indices_to_multihot` and can prove a
top-k routing map (static row count, no host sync); then the dispatch forms (permute, drop-and-pad permute,
sort-based init routing); combine last. `rewrite_pass()` is the graph pass that
`moe_inductor.enable()` and the `moe_inductor` backend install into Inductor.
"""

from __future__ import annotations

from . import combine, drop_pad, init_routing, multihot, permute
from ._rewrite import COUNTER, Rewrite
from .graph_pass import RewritePass, rewrite_pass

FAMILIES = (multihot, permute, drop_pad, init_routing, combine)

__all__ = ["COUNTER", "FAMILIES", "Rewrite", "RewritePass", "rewrite_pass"]
