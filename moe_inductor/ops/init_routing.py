"""moe_init_routing_v2 (sort-based dispatch with optional int8 quantisation) and moe_finalize_routing (its combine).

torch_npu semantics, restated in SPEC §4 / §4b, with the NPU's undefined outputs defined: rows past the valid count
are zero, `expanded_scale` is zero where it has no meaning, and `expanded_row_idx` is -1 for copies without a row
(expert outside the active range, past `active_num`, or over capacity). torch_npu has no backward for these; ours do.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..reference import init_routing as ref
from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check, check_same_device, check_shape, check_tensor, on_cpu
from ._registry import backend, define

# ---------------------------------------------------------------------------------------------------------------------
# moe_init_routing_v2
# ---------------------------------------------------------------------------------------------------------------------

_INIT = "moe_init_routing_v2"
_X_DTYPES = FLOAT_DTYPES + (torch.int8,)
_SCALE_DTYPES = (torch.float32, torch.float64)


class InitRoutingArgs(NamedTuple):
    """The op's arguments in schema order, with torch_npu's defaults (quant_mode excepted: -1 here).

    Kernel, fake kernel and autograd unpack them the same way; `InitRoutingArgs(x, idx, expert_num=8)` builds the
    positional tuple that `torch.ops.moe_inductor.moe_init_routing_v2` takes.
    """

    x: Tensor
    expert_idx: Tensor
    scale: Optional[Tensor] = None
    offset: Optional[Tensor] = None
    active_num: int = -1
    expert_capacity: int = -1
    expert_num: int = -1
    drop_pad_mode: int = 0
    expert_tokens_num_type: int = 0
    expert_tokens_num_flag: bool = False
    quant_mode: int = -1
    active_expert_range: Sequence[int] = ()
    row_idx_type: int = 0


def _check_init_routing(a: InitRoutingArgs) -> tuple[int, int]:
    """Validate; return the active expert range `(start, end)`."""
    op = _INIT
    check_tensor(op, "x", a.x, ndim=2, dtypes=_X_DTYPES)
    check_tensor(op, "expert_idx", a.expert_idx, ndim=2, dtypes=INDEX_DTYPES)
    check(
        a.expert_idx.shape[0] == a.x.shape[0],
        f"{op}: 'expert_idx' has {a.expert_idx.shape[0]} rows but 'x' has {a.x.shape[0]} (one row per token)",
    )
    check_same_device(op, x=a.x, expert_idx=a.expert_idx, scale=a.scale, offset=a.offset)
    check(
        a.drop_pad_mode in (ref.DROPLESS, ref.DROP_PAD), f"{op}: 'drop_pad_mode' must be 0 or 1, got {a.drop_pad_mode}"
    )
    check(
        a.quant_mode in (ref.NO_QUANT, ref.STATIC_QUANT, ref.DYNAMIC_QUANT),
        f"{op}: unknown 'quant_mode' {a.quant_mode}; use -1 (none), 0 (static int8) or 1 (dynamic int8)",
    )
    check(a.row_idx_type in (0, 1), f"{op}: 'row_idx_type' must be 0 (gather) or 1 (scatter), got {a.row_idx_type}")
    check(
        a.expert_tokens_num_type in (ref.CUMSUM, ref.COUNT, ref.KEY_VALUE),
        f"{op}: 'expert_tokens_num_type' must be 0 (cumsum), 1 (count) or 2 (key-value), "
        f"got {a.expert_tokens_num_type}",
    )

    # Expert range.
    expert_num, expert_range = a.expert_num, a.active_expert_range
    check(
        len(expert_range) in (0, 2),
        f"{op}: 'active_expert_range' must be [] or [start, end], got {list(expert_range)}",
    )
    if len(expert_range) == 0:
        check(expert_num > 0, f"{op}: 'expert_num' must be > 0 when 'active_expert_range' is empty, got {expert_num}")
    start, end = ref.expert_range(expert_num, expert_range)
    check(
        0 <= start < end and (expert_num <= 0 or end <= expert_num),
        f"{op}: 'active_expert_range' [{start}, {end}) must satisfy 0 <= start < end <= expert_num ({expert_num})",
    )
    if a.expert_tokens_num_flag and a.expert_tokens_num_type == ref.KEY_VALUE:
        check(expert_num > 0, f"{op}: key-value counts (expert_tokens_num_type=2) need 'expert_num' > 0")

    # Drop / pad.
    if a.drop_pad_mode == ref.DROP_PAD:
        check(a.expert_capacity > 0, f"{op}: 'expert_capacity' must be > 0 in drop/pad mode, got {a.expert_capacity}")
        check(
            start == 0 and end == expert_num,
            f"{op}: drop/pad mode needs the full expert range [0, {expert_num}), got [{start}, {end})",
        )
        check(a.row_idx_type == 0, f"{op}: drop/pad mode only defines row_idx_type=0 (gather), got {a.row_idx_type}")

    # Quantisation arguments.
    hidden, scale, offset = a.x.shape[1], a.scale, a.offset
    if a.quant_mode == ref.NO_QUANT:
        check(offset is None, f"{op}: 'offset' is only used with quant_mode=0 (static)")
        if scale is not None:
            check_tensor(op, "scale", scale, ndim=1, dtypes=_SCALE_DTYPES)
            check_shape(op, "scale", scale, (a.x.shape[0],), "one scale per token when quant_mode=-1")
    else:
        check(a.x.dtype != torch.int8, f"{op}: 'x' is already int8; quant_mode={a.quant_mode} needs floating-point x")
    if a.quant_mode == ref.DYNAMIC_QUANT:
        check(offset is None, f"{op}: 'offset' is only used with quant_mode=0 (static)")
        if scale is not None:
            check_tensor(op, "scale", scale, ndim=2, dtypes=_SCALE_DTYPES)
            check(
                scale.shape[1] == hidden and scale.shape[0] in (1, end - start),
                f"{op}: dynamic-quant smooth 'scale' must be [1, H] or [end - start, H] = [{end - start}, {hidden}], "
                f"got {tuple(scale.shape)}",
            )
    if a.quant_mode == ref.STATIC_QUANT:
        for name, t in (("scale", scale), ("offset", offset)):
            check(t is not None, f"{op}: quant_mode=0 (static) needs '{name}'")
            check_tensor(op, name, t, ndim=(1, 2), dtypes=_SCALE_DTYPES)
            check(
                t.shape[0] == 1 and (t.dim() == 1 or t.shape[1] == hidden),
                f"{op}: static-quant '{name}' must be [1] or [1, H={hidden}], got {tuple(t.shape)}",
            )
    return start, end


@define(
    "moe_init_routing_v2(Tensor x, Tensor expert_idx, Tensor? scale, Tensor? offset, SymInt active_num, "
    "SymInt expert_capacity, int expert_num, int drop_pad_mode, int expert_tokens_num_type, "
    "bool expert_tokens_num_flag, int quant_mode, int[] active_expert_range, int row_idx_type) "
    "-> (Tensor expanded_x, Tensor expanded_row_idx, Tensor expert_token_cumsum_or_count, Tensor expanded_scale)"
)
def moe_init_routing_v2_op(*args):
    a = InitRoutingArgs(*args)
    _check_init_routing(a)
    return backend(a.x).init_routing.moe_init_routing_v2(*args)


@moe_init_routing_v2_op.register_fake
def _(*args):
    a = InitRoutingArgs(*args)
    start, end = _check_init_routing(a)
    num_tokens, topk = a.expert_idx.shape
    shape = ref.expanded_shape(
        num_tokens,
        topk,
        a.x.shape[1],
        active_num=a.active_num,
        expert_capacity=a.expert_capacity,
        expert_num=a.expert_num,
        drop_pad_mode=a.drop_pad_mode,
    )
    num_rows = shape[0] * shape[1] if len(shape) == 3 else shape[0]
    no_quant = a.quant_mode == ref.NO_QUANT
    scale_dtype = a.scale.dtype if no_quant and a.scale is not None else torch.float32
    count_shape = ref.count_shape(start, end, a.expert_num, a.expert_tokens_num_type, a.expert_tokens_num_flag)
    return (
        a.x.new_empty(shape, dtype=a.x.dtype if no_quant else torch.int8),
        a.x.new_empty((num_tokens * topk,), dtype=torch.int32),
        a.x.new_empty(count_shape, dtype=torch.int64),
        a.x.new_empty((num_rows,), dtype=scale_dtype),
    )


def _init_setup(ctx, inputs, output):
    a = InitRoutingArgs(*inputs)
    ctx.quant_mode, ctx.row_idx_type = a.quant_mode, a.row_idx_type
    ctx.topk = a.expert_idx.shape[1]
    ctx.has_scale = a.scale is not None
    ctx.save_for_backward(output[1])


def _init_backward(ctx, grad_expanded_x, _grad_row_idx, _grad_counts, grad_expanded_scale):
    grads = [None] * len(InitRoutingArgs._fields)
    # Quantised outputs are int8 and carry no gradient; their per-row scale is not differentiated either.
    if ctx.quant_mode != ref.NO_QUANT:
        return tuple(grads)
    (expanded_row_idx,) = ctx.saved_tensors
    need_scale = ctx.has_scale and ctx.needs_input_grad[2]
    grad_x, grad_scale = backend(expanded_row_idx).init_routing.moe_init_routing_v2_backward(
        grad_expanded_x, grad_expanded_scale if need_scale else None, expanded_row_idx, ctx.row_idx_type, ctx.topk
    )
    grads[0] = grad_x if ctx.needs_input_grad[0] else None
    grads[2] = grad_scale
    return tuple(grads)


moe_init_routing_v2_op.register_autograd(_init_backward, setup_context=_init_setup)

# ---------------------------------------------------------------------------------------------------------------------
# moe_finalize_routing
# ---------------------------------------------------------------------------------------------------------------------

_FIN = "moe_finalize_routing"


class FinalizeArgs(NamedTuple):
    """The op's arguments in schema order (torch_npu's names, `expert_for_source_row` spelled right)."""

    expanded_permuted_rows: Tensor
    skip1: Optional[Tensor]
    skip2: Optional[Tensor]
    bias: Optional[Tensor]
    scales: Optional[Tensor]
    expanded_src_to_dst_row: Tensor
    expert_for_source_row: Optional[Tensor] = None
    drop_pad_mode: int = 0
    k: Optional[int] = None


def _finalize_topk(a: FinalizeArgs):
    """K of a finalize call: `k` if given, else the columns of `scales` or of the expert table (None if unknown)."""
    if a.k is not None:
        return a.k
    for t in (a.scales, a.expert_for_source_row):
        if t is not None and t.dim() == 2:
            return t.shape[1]
    return None


def _check_finalize(a: FinalizeArgs):
    """Validate; return (num_tokens, topk)."""
    op = _FIN
    check(a.drop_pad_mode in (0, 1, 2, 3), f"{op}: 'drop_pad_mode' must be 0, 1, 2 or 3, got {a.drop_pad_mode}")
    drop = a.drop_pad_mode in ref.DROP_PAD_MODES
    expanded, row_idx = a.expanded_permuted_rows, a.expanded_src_to_dst_row
    check_tensor(op, "expanded_permuted_rows", expanded, ndim=3 if drop else 2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "expanded_src_to_dst_row", row_idx, ndim=1, dtypes=INDEX_DTYPES)
    hidden = expanded.shape[-1]

    # K comes from whichever argument carries it; all that do must agree.
    topk = _finalize_topk(a)
    check(topk is not None, f"{op}: pass 'k' when both 'scales' and 'expert_for_source_row' are None")
    for name in ("scales", "expert_for_source_row"):
        t = getattr(a, name)
        if t is not None:
            check_tensor(op, name, t, ndim=2)
            check(t.shape[1] == topk, f"{op}: '{name}' has {t.shape[1]} columns but top-k is {topk}")
    check(topk > 0, f"{op}: top-k must be > 0, got {topk}")
    num_copies = row_idx.shape[0]
    check(
        num_copies % topk == 0,
        f"{op}: 'expanded_src_to_dst_row' has {num_copies} entries, not num_rows * K for K={topk}",
    )
    num_tokens = num_copies // topk

    if a.scales is not None:
        check_tensor(op, "scales", a.scales, dtypes=FLOAT_DTYPES)
        check_shape(op, "scales", a.scales, (num_tokens, topk), "[num_rows, K]")
    if a.expert_for_source_row is not None:
        check_tensor(op, "expert_for_source_row", a.expert_for_source_row, dtypes=INDEX_DTYPES)
        check_shape(op, "expert_for_source_row", a.expert_for_source_row, (num_tokens, topk), "[num_rows, K]")
    for name in ("skip1", "skip2"):
        t = getattr(a, name)
        if t is not None:
            check_tensor(op, name, t, ndim=2, dtypes=FLOAT_DTYPES)
            check_shape(op, name, t, (num_tokens, hidden), "the output shape [num_rows, H]")
    if a.bias is not None:
        check_tensor(op, "bias", a.bias, ndim=2, dtypes=FLOAT_DTYPES)
        check(a.bias.shape[1] == hidden, f"{op}: 'bias' must be [E, H={hidden}], got {tuple(a.bias.shape)}")
        check(
            a.expert_for_source_row is not None,
            f"{op}: 'bias' needs 'expert_for_source_row' to pick each row's expert",
        )
    check_same_device(op, **{name: t for name, t in a._asdict().items() if isinstance(t, Tensor)})
    return num_tokens, topk


def _check_finalize_values(a: FinalizeArgs, topk: int) -> None:
    """CPU data checks: row indices in [-1, rows), and the expert of every used row inside `bias`."""
    row_idx = a.expanded_src_to_dst_row
    if row_idx.numel() == 0:
        return
    expanded = a.expanded_permuted_rows
    num_rows = expanded.reshape(-1, expanded.shape[-1]).shape[0]
    low, high = int(row_idx.min()), int(row_idx.max())
    check(
        low >= -1 and high < num_rows,
        f"{_FIN}: 'expanded_src_to_dst_row' must hold rows in [0, {num_rows}) or -1, found values in [{low}, {high}]",
    )
    if a.bias is not None:
        idx = ref.finalize_index(row_idx, row_idx.shape[0] // topk, topk, a.drop_pad_mode)
        used = a.expert_for_source_row[idx >= 0]
        if used.numel():
            low, high = int(used.min()), int(used.max())
            check(
                low >= 0 and high < a.bias.shape[0],
                f"{_FIN}: 'expert_for_source_row' must hold experts in [0, {a.bias.shape[0]}) (rows of 'bias'), "
                f"found values in [{low}, {high}]",
            )


@define(
    "moe_finalize_routing(Tensor expanded_permuted_rows, Tensor? skip1, Tensor? skip2, Tensor? bias, Tensor? scales, "
    "Tensor expanded_src_to_dst_row, Tensor? expert_for_source_row, int drop_pad_mode, int? k) -> Tensor"
)
def moe_finalize_routing_op(*args):
    a = FinalizeArgs(*args)
    _, topk = _check_finalize(a)
    if on_cpu(a.expanded_src_to_dst_row):
        _check_finalize_values(a, topk)
    return backend(a.expanded_permuted_rows).init_routing.moe_finalize_routing(*a[:-1], topk)


@moe_finalize_routing_op.register_fake
def _(*args):
    a = FinalizeArgs(*args)
    num_tokens, _ = _check_finalize(a)
    return a.expanded_permuted_rows.new_empty((num_tokens, a.expanded_permuted_rows.shape[-1]))


def _finalize_setup(ctx, inputs, output):
    a = FinalizeArgs(*inputs)
    ctx.save_for_backward(
        a.expanded_permuted_rows, a.bias, a.scales, a.expanded_src_to_dst_row, a.expert_for_source_row
    )
    ctx.drop_pad_mode = a.drop_pad_mode
    ctx.topk = _finalize_topk(a)
    ctx.skip_dtypes = tuple(s.dtype if s is not None else None for s in (a.skip1, a.skip2))


def _finalize_backward(ctx, grad_out):
    expanded, bias, scales, row_idx, expert_for_source_row = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_rows, grad_bias, grad_scales = backend(grad_out).init_routing.moe_finalize_routing_backward(
        grad_out,
        expanded,
        bias,
        scales,
        row_idx,
        expert_for_source_row,
        ctx.drop_pad_mode,
        ctx.topk,
        need_rows_grad=need[0],
        need_bias_grad=bias is not None and need[3],
        need_scales_grad=scales is not None and need[4],
    )
    grad_skips = [
        grad_out.to(dtype) if dtype is not None and need[1 + i] else None for i, dtype in enumerate(ctx.skip_dtypes)
    ]
    return grad_rows, grad_skips[0], grad_skips[1], grad_bias, grad_scales, None, None, None, None


moe_finalize_routing_op.register_autograd(_finalize_backward, setup_context=_finalize_setup)

# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def moe_init_routing_v2(
    x: Tensor,
    expert_idx: Tensor,
    *,
    scale: Optional[Tensor] = None,
    offset: Optional[Tensor] = None,
    active_num: int = -1,
    expert_capacity: int = -1,
    expert_num: int = -1,
    drop_pad_mode: int = 0,
    expert_tokens_num_type: int = 0,
    expert_tokens_num_flag: bool = False,
    quant_mode: int = -1,
    active_expert_range: Sequence[int] = (),
    row_idx_type: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torch_npu `npu_moe_init_routing_v2`.

    Returns `(expanded_x, expanded_row_idx, expert_token_cumsum_or_count, expanded_scale)`.

    Copies of each token are sorted by expert (stable); `expanded_x[i] = x[order[i] // K]` (dropless) or slot
    `e * C + rank` (drop_pad_mode=1). `quant_mode`: -1 none (the default here; torch_npu's default changed across
    releases), 1 dynamic per-row int8, 0 static int8. Differentiable in `x` (and a per-token `scale`) when
    `quant_mode=-1`.
    """
    args = InitRoutingArgs(
        x,
        expert_idx,
        scale,
        offset,
        active_num,
        expert_capacity,
        expert_num,
        drop_pad_mode,
        expert_tokens_num_type,
        expert_tokens_num_flag,
        quant_mode,
        active_expert_range,
        row_idx_type,
    )
    return moe_init_routing_v2_op(*args)


def moe_finalize_routing(
    expanded_permuted_rows: Tensor,
    skip1: Optional[Tensor],
    skip2: Optional[Tensor],
    bias: Optional[Tensor],
    scales: Optional[Tensor],
    expanded_src_to_dst_row: Tensor,
    export_for_source_row: Optional[Tensor] = None,
    drop_pad_mode: int = 0,
    k: Optional[int] = None,
    *,
    expert_for_source_row: Optional[Tensor] = None,
) -> Tensor:
    """torch_npu `npu_moe_finalize_routing`: `out[i] = skip1 + skip2 + sum_k scales[i,k] * (row(i,k) + bias[e(i,k)])`.

    `row(i, k)` is `expanded_src_to_dst_row[k * N + i]` for drop_pad_mode 0/1 and `[i * K + k]` for 2/3 (use 2/3
    with moe_init_routing_v2's `expanded_row_idx`); a -1 index drops the whole term. `export_for_source_row` keeps
    torch_npu's spelling; `expert_for_source_row=` is accepted too. `k` is only needed when `scales` and the expert
    table are both None.
    """
    if expert_for_source_row is not None:
        if export_for_source_row is not None:
            raise ValueError(f"{_FIN}: pass 'export_for_source_row' or 'expert_for_source_row', not both")
        export_for_source_row = expert_for_source_row
    args = FinalizeArgs(
        expanded_permuted_rows,
        skip1,
        skip2,
        bias,
        scales,
        expanded_src_to_dst_row,
        export_for_source_row,
        drop_pad_mode,
        k,
    )
    return moe_finalize_routing_op(*args)
