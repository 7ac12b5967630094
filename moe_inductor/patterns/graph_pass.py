"""The graph pass that applies every rewrite family, as an Inductor `CustomGraphPass`.

It runs as Inductor's `pre_grad_custom_pass` (on the graph Dynamo captured, before AOTAutograd; see `_rewrite`).
Its `uuid()` covers the package version, the enabled rewrites and the source of every file that defines them:
Inductor's caches key on it, and they do not see which patterns are registered (a stale cache entry would
otherwise serve a graph compiled with other rewrites).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from typing import Iterable, Optional

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from ._rewrite import build_pass, canonicalize


class RewritePass(CustomGraphPass):
    """Canonicalize the graph, then apply the families' rewrites in order. `only` restricts to named rewrites."""

    def __init__(self, only: Optional[Iterable[str]] = None) -> None:
        self.only = None if only is None else frozenset(only)

    @property
    def families(self):
        from . import FAMILIES

        return FAMILIES

    def rewrite_names(self) -> list[str]:
        names = [r.name for family in self.families for r in family.REWRITES]
        return [n for n in names if self.only is None or n in self.only]

    def __call__(self, graph: fx.Graph) -> None:
        for family, matcher in _matchers(self.only):
            # Again before each family: replacements are built with Proxies (`x.unsqueeze(1)` call_method nodes).
            canonicalize(graph)
            for node in graph.nodes:  # mutation regions computed earlier are stale once writes are functional
                node.meta.pop("mutation_region_id", None)
            matcher.apply(graph)
            if hasattr(family, "finish"):  # a family's clean-up over its own rewrites (see init_routing)
                family.finish(graph)
        graph.lint()
        if graph.owning_module is not None:
            graph.owning_module.recompile()

    def uuid(self) -> bytes:
        from .. import __version__

        digest = hashlib.sha256(f"moe_inductor {__version__} {sorted(self.rewrite_names())}".encode())
        for module in _source_modules():
            digest.update(inspect.getsource(module).encode())
        return digest.digest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RewritePass) and other.only == self.only

    def __hash__(self) -> int:
        return hash((RewritePass, self.only))


def _source_modules():
    from . import FAMILIES, _rewrite, graph_pass

    return (_rewrite, graph_pass, *FAMILIES)


@functools.lru_cache(maxsize=None)
def _matchers(only: Optional[frozenset]):
    from . import FAMILIES

    matchers = []
    for family in FAMILIES:
        rewrites = [r for r in family.REWRITES if only is None or r.name in only]
        if rewrites:
            matchers.append((family, build_pass(rewrites, f"moe_inductor_{family.__name__.rsplit('.', 1)[-1]}")))
    return tuple(matchers)


def rewrite_pass(only: Optional[Iterable[str]] = None) -> RewritePass:
    """The pass with all rewrites, or only the named ones."""
    return RewritePass(only)
