"""TEST-ONLY stand-in for the part of `torchair` our converters use: `register_fx_node_ge_converter` and the public
GE builder API of `torchair.ge` (`custom_op`, `Cast`, `Const`, `DataType`, `attr`). It builds nothing: every node is
recorded in `GRAPH`, so tests can read which GE ops a converter emits, with which inputs and attributes.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Optional

CONVERTERS: dict[Any, Any] = {}  # op overload -> converter


def register_fx_node_ge_converter(op):
    def decorate(fn):
        CONVERTERS[op] = fn
        return fn

    return decorate


class DataType:
    DT_FLOAT = 0
    DT_FLOAT16 = 1
    DT_INT8 = 2
    DT_INT32 = 3
    DT_UINT8 = 4
    DT_INT64 = 9
    DT_BOOL = 12
    DT_BF16 = 27


@dataclass
class Tensor:
    """A GE tensor as converters see it: dtype, static sizes, and the node that produced it."""

    dtype: Optional[int]
    symsize: list = field(default_factory=list)
    node: Optional["Node"] = None
    index: int = 0

    @property
    def rank(self) -> int:
        return len(self.symsize)


@dataclass
class Node:
    op_type: str
    inputs: dict
    attrs: dict
    outputs: list


GRAPH: list[Node] = []


@dataclass(frozen=True)
class Attr:
    kind: str
    value: Any


def _output_dtype(op_type: str, inputs: dict, attrs: dict, name: str) -> Optional[int]:
    """Enough dtype inference for chained converters: first tensor input's dtype, except known index outputs."""
    if name in ("sorted_indices", "expanded_row_idx", "out_index", "permute_token_id"):
        return DataType.DT_INT32
    if name == "expert_tokens_count_or_cumsum":
        return DataType.DT_INT64
    if op_type == "Fill":
        return inputs["value"].dtype
    for value in inputs.values():
        if isinstance(value, Tensor):
            return value.dtype
    return None


def custom_op(op_type, *, inputs=None, outputs=None, attrs=None, node_name=None):
    node = Node(op_type, dict(inputs or {}), dict(attrs or {}), list(outputs or []))
    GRAPH.append(node)
    results = []
    for i, out in enumerate(node.outputs):
        if isinstance(out, tuple):  # dynamic output (name, count): a list
            name, count = out
            dtype = _output_dtype(op_type, node.inputs, node.attrs, name)
            results.append([Tensor(dtype, node=node, index=i) for _ in range(count)])
        else:
            results.append(Tensor(_output_dtype(op_type, node.inputs, node.attrs, out), node=node, index=i))
    return results[0] if len(results) == 1 else tuple(results)  # one output: itself (a list if dynamic)


def Cast(x, *, dst_type, dependencies=None, node_name=None):  # noqa: N802 (torchair's spelling)
    node = Node("Cast", {"x": x}, {"dst_type": dst_type}, ["y"])
    GRAPH.append(node)
    return Tensor(dst_type, list(x.symsize), node=node)


def Const(value, dtype=None, node_name=None, readable=True):  # noqa: N802
    node = Node("Const", {}, {"value": value, "dtype": dtype}, ["y"])
    GRAPH.append(node)
    return Tensor(dtype, node=node)


attr = types.SimpleNamespace(
    Int=lambda v: Attr("Int", v),
    Bool=lambda v: Attr("Bool", v),
    ListInt=lambda v: Attr("ListInt", list(v)),
)

ge = types.SimpleNamespace(DataType=DataType, Tensor=Tensor, custom_op=custom_op, Cast=Cast, Const=Const, attr=attr)


def reset() -> None:
    GRAPH.clear()
    CONVERTERS.clear()


def ops(op_type: str) -> list[Node]:
    return [n for n in GRAPH if n.op_type == op_type]
