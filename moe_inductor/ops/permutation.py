"""Permute tokens into expert-major order by a dense routing map, and combine them back (SPEC §2, §2b, §3).

Two calling conventions over one row order (expert-major, ascending token id within an expert):

* torch_npu style, `moe_token_permute_with_routing_map` / `moe_token_unpermute_with_routing_map`: `sorted_indices`
  is int32; in dropless mode it is the INVERSE map (row of each `[T, K]` copy), output size `num_out_tokens` must
  be `T * K` with exactly K routed experts per token.
* Megatron style, `permute` / `unpermute` (`megatron.core.transformer.moe.moe_utils`): `sorted_indices` is the
  FORWARD map (token of each row, int64); `num_out_tokens=None` gives a data-dependent number of rows.

Drop-and-pad (both styles): expert e owns rows `[e*C, (e+1)*C)`, filled by its routed tokens and then by its
lowest non-routed ones; `sorted_indices` is the forward map. Unpermute accumulates in float32 without atomics.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from ..reference import permutation as ref
from ._checks import FLOAT_DTYPES, INDEX_DTYPES, ROUTING_MAP_DTYPES, check, check_same_device, check_shape
from ._checks import check_tensor, on_cpu
from ._registry import backend, define

# ---------------------------------------------------------------------------------------------------------------------
# Shared validation
# ---------------------------------------------------------------------------------------------------------------------


def _check_permute_inputs(op: str, tokens: Tensor, routing_map: Tensor, probs: Optional[Tensor], num_out_tokens):
    check_tensor(op, "tokens", tokens, ndim=2)
    check_tensor(op, "routing_map", routing_map, ndim=2, dtypes=ROUTING_MAP_DTYPES)
    num_tokens, num_experts = routing_map.shape
    check(
        tokens.shape[0] == num_tokens,
        f"{op}: 'tokens' has {tokens.shape[0]} rows but 'routing_map' has {num_tokens} (one row per token)",
    )
    if probs is not None:
        check_tensor(op, "probs", probs, ndim=2, dtypes=FLOAT_DTYPES)
        check_shape(op, "probs", probs, (num_tokens, num_experts), "same as routing_map")
    check_same_device(op, tokens=tokens, routing_map=routing_map, probs=probs)
    if num_out_tokens is not None:
        check(num_out_tokens >= 0, f"{op}: 'num_out_tokens' must be >= 0, got {num_out_tokens}")
    return num_tokens, num_experts


def _check_capacity(op: str, capacity, num_tokens, num_experts, what: str) -> None:
    check(num_experts > 0, f"{op}: drop_and_pad needs 'routing_map' with at least one expert column")
    check(
        capacity > 0 or guard_or_false(num_tokens == 0),
        f"{op}: capacity {what} = {capacity} must be > 0 (drop_and_pad with T={num_tokens} tokens)",
    )
    check(
        capacity <= num_tokens,
        f"{op}: capacity {what} = {capacity} exceeds the number of tokens T={num_tokens}; an expert cannot hold "
        f"more distinct tokens than exist",
    )


def _check_routing_map_values(op: str, routing_map: Tensor) -> None:
    """CPU data check: an integer routing map holds only 0 and 1."""
    if routing_map.dtype != torch.bool and routing_map.numel():
        bad = (routing_map != 0) & (routing_map != 1)
        if bool(bad.any()):
            value = int(routing_map[bad][0])
            raise ValueError(f"{op}: 'routing_map' must hold only 0/1 (or be bool), found {value}")


def _check_experts_per_token(routing_map: Tensor, num_rows: int) -> None:
    """CPU data check of a dropless torch_npu permute: every token routes to exactly K = num_rows // T experts."""
    if routing_map.shape[0] == 0:
        return
    topk = num_rows // routing_map.shape[0]
    per_token = routing_map.bool().sum(1)
    wrong = (per_token != topk).nonzero()
    if wrong.numel():
        row = int(wrong[0])
        raise ValueError(
            f"{_NPU_PERMUTE}: 'routing_map' row {row} routes to {int(per_token[row])} experts; dropless "
            f"permute with num_out_tokens={num_rows} needs exactly num_out_tokens // T = {topk} per token"
        )


def _check_unpermute_inputs(
    op: str, permuted: Tensor, sorted_indices: Tensor, restore_shape, probs, routing_map, index_dtypes
):
    check_tensor(op, "permuted_tokens", permuted, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "sorted_indices", sorted_indices, ndim=1, dtypes=index_dtypes)
    check(len(restore_shape) == 2, f"{op}: 'restore_shape' must be (num_tokens, hidden), got {list(restore_shape)}")
    num_tokens, hidden = restore_shape
    check(num_tokens >= 0, f"{op}: 'restore_shape' has a negative number of tokens: {num_tokens}")
    check(
        permuted.shape[1] == hidden,
        f"{op}: 'permuted_tokens' has hidden size {permuted.shape[1]} but 'restore_shape' says {hidden}",
    )
    check(
        sorted_indices.shape[0] == permuted.shape[0],
        f"{op}: 'sorted_indices' has {sorted_indices.shape[0]} entries but 'permuted_tokens' has "
        f"{permuted.shape[0]} rows; there is one index per permuted row",
    )
    if probs is not None:
        check_tensor(op, "probs", probs, ndim=2, dtypes=FLOAT_DTYPES)
        check(probs.shape[0] == num_tokens, f"{op}: 'probs' has {probs.shape[0]} rows, 'restore_shape' {num_tokens}")
    if routing_map is not None:
        check_tensor(op, "routing_map", routing_map, ndim=2, dtypes=ROUTING_MAP_DTYPES)
        check(
            routing_map.shape[0] == num_tokens,
            f"{op}: 'routing_map' has {routing_map.shape[0]} rows, 'restore_shape' {num_tokens}",
        )
        if probs is not None:
            check_shape(op, "probs", probs, tuple(routing_map.shape), "same as routing_map")
    check_same_device(op, permuted_tokens=permuted, sorted_indices=sorted_indices, probs=probs, routing_map=routing_map)
    return num_tokens, hidden


def _check_pad_rows(op: str, num_rows, probs: Optional[Tensor]) -> None:
    if probs is not None:
        num_experts = probs.shape[1]
        check(num_experts > 0, f"{op}: drop_and_pad needs 'probs' with at least one expert column")
        check(
            num_rows % num_experts == 0,
            f"{op}: drop_and_pad needs E * capacity permuted rows; {num_rows} is not a multiple of E={num_experts}",
        )


def _check_index_values(op: str, sorted_indices: Tensor, bound: int, what: str) -> None:
    """CPU data check: indices in [-1, bound) (-1 is skipped)."""
    if sorted_indices.numel():
        low, high = int(sorted_indices.min()), int(sorted_indices.max())
        check(
            low >= -1 and high < bound,
            f"{op}: 'sorted_indices' must hold {what} in [0, {bound}) or -1, found values in [{low}, {high}]",
        )


def _empty_probs(tokens: Tensor) -> Tensor:
    """Stand-in for "no permuted probs": ops cannot return None, the public wrappers turn it back into None."""
    return tokens.new_empty((0,))


# ---------------------------------------------------------------------------------------------------------------------
# moe_token_permute_with_routing_map (torch_npu)
# ---------------------------------------------------------------------------------------------------------------------

_NPU_PERMUTE = "moe_token_permute_with_routing_map"


def _npu_permute_rows(tokens, routing_map, probs, num_out_tokens, drop_and_pad):
    """Validate, and return the number of output rows."""
    op = _NPU_PERMUTE
    num_tokens, num_experts = _check_permute_inputs(op, tokens, routing_map, probs, num_out_tokens)
    requested = num_tokens if num_out_tokens is None else num_out_tokens
    if drop_and_pad:
        capacity = ref.npu_capacity(num_tokens, num_experts, num_out_tokens)
        _check_capacity(op, capacity, num_tokens, num_experts, "num_out_tokens // num_experts")
        return num_experts * capacity
    if guard_or_false(num_tokens == 0):
        check(requested == 0, f"{op}: 'num_out_tokens' must be 0 when there are no tokens, got {requested}")
        return 0
    check(
        requested % num_tokens == 0,
        f"{op}: 'num_out_tokens' ({requested}) must be a multiple of the number of tokens T={num_tokens} "
        f"(dropless: T * topk)",
    )
    topk = requested // num_tokens
    check(
        topk <= num_experts,
        f"{op}: 'num_out_tokens' // T = {topk} experts per token, but 'routing_map' has only {num_experts}",
    )
    return requested


@define(
    "moe_token_permute_with_routing_map(Tensor tokens, Tensor routing_map, Tensor? probs, SymInt? num_out_tokens, "
    "bool drop_and_pad) -> (Tensor permuted_tokens, Tensor permuted_probs, Tensor sorted_indices)"
)
def moe_token_permute_with_routing_map_op(tokens, routing_map, probs, num_out_tokens, drop_and_pad):
    num_rows = _npu_permute_rows(tokens, routing_map, probs, num_out_tokens, drop_and_pad)
    if on_cpu(routing_map):
        _check_routing_map_values(_NPU_PERMUTE, routing_map)
        if not drop_and_pad:
            _check_experts_per_token(routing_map, num_rows)
    permuted, permuted_probs, sorted_indices = backend(tokens).permutation.moe_token_permute_with_routing_map(
        tokens, routing_map, probs, num_out_tokens, drop_and_pad
    )
    return permuted, permuted_probs if probs is not None else _empty_probs(tokens), sorted_indices


@moe_token_permute_with_routing_map_op.register_fake
def _(tokens, routing_map, probs, num_out_tokens, drop_and_pad):
    num_rows = _npu_permute_rows(tokens, routing_map, probs, num_out_tokens, drop_and_pad)
    permuted = tokens.new_empty((num_rows, tokens.shape[1]))
    permuted_probs = probs.new_empty((num_rows,)) if probs is not None else _empty_probs(tokens)
    # One index per row in both modes: dropless has T * K copies and T * K rows.
    return permuted, permuted_probs, routing_map.new_empty((num_rows,), dtype=torch.int32)


def _make_permute_setup(pads: Callable[[Optional[int], bool], bool]):
    """setup_context of a permute; `pads(num_out_tokens, drop_and_pad)` says whether its rows are drop-and-pad."""

    def setup(ctx, inputs, output):
        tokens, routing_map, probs, num_out_tokens, drop_and_pad = inputs
        # sorted_indices is saved for its length: taking the row count from the incoming gradient instead leaves an
        # unbacked size (Megatron, num_out_tokens=None) that AOTAutograd's partitioner cannot trace to the forward.
        ctx.save_for_backward(routing_map, output[2])
        ctx.has_probs = probs is not None
        ctx.drop_and_pad = pads(num_out_tokens, drop_and_pad)

    return setup


def _permute_backward(ctx, grad_permuted, grad_permuted_probs, _grad_sorted_indices):
    routing_map, sorted_indices = ctx.saved_tensors
    grad_tokens, grad_probs = backend(routing_map).permutation.permute_backward(
        grad_permuted if ctx.needs_input_grad[0] else None,
        grad_permuted_probs if ctx.has_probs and ctx.needs_input_grad[2] else None,
        routing_map,
        sorted_indices.shape[0],
        ctx.drop_and_pad,
    )
    return grad_tokens, None, grad_probs, None, None


moe_token_permute_with_routing_map_op.register_autograd(
    _permute_backward, setup_context=_make_permute_setup(lambda num_out_tokens, drop_and_pad: drop_and_pad)
)

# ---------------------------------------------------------------------------------------------------------------------
# moe_token_unpermute_with_routing_map (torch_npu)
# ---------------------------------------------------------------------------------------------------------------------

_NPU_UNPERMUTE = "moe_token_unpermute_with_routing_map"


def _check_npu_unpermute(permuted, sorted_indices, restore_shape, probs, routing_map, drop_and_pad):
    op = _NPU_UNPERMUTE
    num_tokens, _ = _check_unpermute_inputs(
        op, permuted, sorted_indices, restore_shape, probs, routing_map, INDEX_DTYPES
    )
    num_rows = sorted_indices.shape[0]
    if drop_and_pad:
        _check_pad_rows(op, num_rows, probs)
        return num_tokens
    if guard_or_false(num_tokens == 0):
        check(num_rows == 0, f"{op}: 'sorted_indices' must be empty when there are no tokens, got {num_rows}")
    else:
        check(
            num_rows % num_tokens == 0,
            f"{op}: dropless 'sorted_indices' has {num_rows} entries, not T * topk for T={num_tokens}",
        )
    if probs is not None:
        check(routing_map is not None, f"{op}: 'routing_map' is required with 'probs' in dropless mode")
    return num_tokens


@define(
    "moe_token_unpermute_with_routing_map(Tensor permuted_tokens, Tensor sorted_indices, SymInt[] restore_shape, "
    "Tensor? probs, Tensor? routing_map, bool drop_and_pad) -> Tensor"
)
def moe_token_unpermute_with_routing_map_op(
    permuted_tokens, sorted_indices, restore_shape, probs, routing_map, drop_and_pad
):
    num_tokens = _check_npu_unpermute(permuted_tokens, sorted_indices, restore_shape, probs, routing_map, drop_and_pad)
    if on_cpu(sorted_indices):
        bound, what = (num_tokens, "token ids") if drop_and_pad else (permuted_tokens.shape[0], "row ids")
        _check_index_values(_NPU_UNPERMUTE, sorted_indices, bound, what)
        if routing_map is not None:
            _check_routing_map_values(_NPU_UNPERMUTE, routing_map)
    return backend(permuted_tokens).permutation.moe_token_unpermute_with_routing_map(
        permuted_tokens, sorted_indices, restore_shape, probs, routing_map, drop_and_pad
    )


@moe_token_unpermute_with_routing_map_op.register_fake
def _(permuted_tokens, sorted_indices, restore_shape, probs, routing_map, drop_and_pad):
    _check_npu_unpermute(permuted_tokens, sorted_indices, restore_shape, probs, routing_map, drop_and_pad)
    return permuted_tokens.new_empty(tuple(restore_shape))


def _unpermute_setup(ctx, inputs, output):
    permuted, sorted_indices, restore_shape, probs, routing_map, drop_and_pad = inputs
    ctx.save_for_backward(permuted, sorted_indices, probs, routing_map)
    ctx.num_tokens = restore_shape[0]
    ctx.drop_and_pad = drop_and_pad


def _make_unpermute_backward(name: str):
    """Backward of an unpermute; `name` is the backend function computing (grad permuted, grad probs)."""

    def backward(ctx, grad_out):
        permuted, sorted_indices, probs, routing_map = ctx.saved_tensors
        need_probs_grad = probs is not None and ctx.needs_input_grad[3]
        grad_permuted, grad_probs = getattr(backend(permuted).permutation, name)(
            grad_out, permuted, sorted_indices, probs, routing_map, ctx.drop_and_pad, need_probs_grad
        )
        return grad_permuted if ctx.needs_input_grad[0] else None, None, None, grad_probs, None, None

    return backward


moe_token_unpermute_with_routing_map_op.register_autograd(
    _make_unpermute_backward("moe_token_unpermute_backward"), setup_context=_unpermute_setup
)

# ---------------------------------------------------------------------------------------------------------------------
# permute / unpermute (Megatron)
# ---------------------------------------------------------------------------------------------------------------------

_PERMUTE = "permute"


def _megatron_permute_rows(tokens, routing_map, probs, num_out_tokens, drop_and_pad):
    """Validate, and return the number of output rows (None: data-dependent)."""
    op = _PERMUTE
    num_tokens, num_experts = _check_permute_inputs(op, tokens, routing_map, probs, num_out_tokens)
    if num_out_tokens is None:
        return None
    if drop_and_pad:
        check(num_experts > 0, f"{op}: drop_and_pad needs 'routing_map' with at least one expert column")
        capacity = ref.megatron_capacity(num_tokens, num_experts, num_out_tokens)
        _check_capacity(op, capacity, num_tokens, num_experts, "min(num_out_tokens // num_experts, T)")
        return num_experts * capacity
    check(
        num_out_tokens <= num_tokens * num_experts,
        f"{op}: 'num_out_tokens' ({num_out_tokens}) exceeds the T * E = {num_tokens * num_experts} "
        f"(token, expert) pairs of 'routing_map'",
    )
    return num_out_tokens


# num_out_tokens=None has a data-dependent row count: that call stays one opaque op under torch.compile (its fake
# kernel declares an unbacked size; the kernel syncs once to size its outputs, as Megatron's masked_select does).
@define(
    "permute(Tensor tokens, Tensor routing_map, Tensor? probs, SymInt? num_out_tokens, bool drop_and_pad) "
    "-> (Tensor permuted_tokens, Tensor permuted_probs, Tensor sorted_indices)",
    traceable=lambda tokens, routing_map, probs, num_out_tokens, drop_and_pad: num_out_tokens is not None,
)
def permute_op(tokens, routing_map, probs, num_out_tokens, drop_and_pad):
    _megatron_permute_rows(tokens, routing_map, probs, num_out_tokens, drop_and_pad)
    if on_cpu(routing_map):
        _check_routing_map_values(_PERMUTE, routing_map)
    permuted, permuted_probs, sorted_indices = backend(tokens).permutation.permute(
        tokens, routing_map, probs, num_out_tokens, drop_and_pad
    )
    return permuted, permuted_probs if probs is not None else _empty_probs(tokens), sorted_indices


@permute_op.register_fake
def _(tokens, routing_map, probs, num_out_tokens, drop_and_pad):
    num_rows = _megatron_permute_rows(tokens, routing_map, probs, num_out_tokens, drop_and_pad)
    if num_rows is None:
        # Megatron's masked_select form: as many rows as routed pairs, known only at run time.
        bound = routing_map.shape[0] * routing_map.shape[1]
        ctx = torch.library.get_ctx()
        num_rows = ctx.new_dynamic_size(max=bound) if isinstance(bound, int) else ctx.new_dynamic_size()
        if not isinstance(bound, int):
            torch._check(num_rows <= bound)
    permuted = tokens.new_empty((num_rows, tokens.shape[1]))
    permuted_probs = probs.new_empty((num_rows,)) if probs is not None else _empty_probs(tokens)
    return permuted, permuted_probs, routing_map.new_empty((num_rows,), dtype=torch.int64)


# Megatron takes the dropless path when num_out_tokens is None, whatever drop_and_pad says.
permute_op.register_autograd(
    _permute_backward,
    setup_context=_make_permute_setup(lambda num_out_tokens, drop_and_pad: drop_and_pad and num_out_tokens is not None),
)

_UNPERMUTE = "unpermute"


def _check_megatron_unpermute(permuted, sorted_indices, restore_shape, probs, routing_map, drop_and_pad):
    op = _UNPERMUTE
    num_tokens, _ = _check_unpermute_inputs(
        op, permuted, sorted_indices, restore_shape, probs, routing_map, INDEX_DTYPES
    )
    if drop_and_pad:
        _check_pad_rows(op, sorted_indices.shape[0], probs)
    elif probs is not None:
        check(routing_map is not None, f"{op}: 'routing_map' must be provided to permute the probs")
    return num_tokens


@define(
    "unpermute(Tensor permuted_tokens, Tensor sorted_indices, SymInt[] restore_shape, Tensor? probs, "
    "Tensor? routing_map, bool drop_and_pad) -> Tensor"
)
def unpermute_op(permuted_tokens, sorted_indices, restore_shape, probs, routing_map, drop_and_pad):
    num_tokens = _check_megatron_unpermute(
        permuted_tokens, sorted_indices, restore_shape, probs, routing_map, drop_and_pad
    )
    if on_cpu(sorted_indices):
        _check_index_values(_UNPERMUTE, sorted_indices, num_tokens, "token ids")
        if routing_map is not None:
            _check_routing_map_values(_UNPERMUTE, routing_map)
    return backend(permuted_tokens).permutation.unpermute(
        permuted_tokens, sorted_indices, restore_shape, probs, routing_map, drop_and_pad
    )


@unpermute_op.register_fake
def _(permuted_tokens, sorted_indices, restore_shape, probs, routing_map, drop_and_pad):
    _check_megatron_unpermute(permuted_tokens, sorted_indices, restore_shape, probs, routing_map, drop_and_pad)
    return permuted_tokens.new_empty(tuple(restore_shape))


unpermute_op.register_autograd(_make_unpermute_backward("unpermute_backward"), setup_context=_unpermute_setup)

# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def moe_token_permute_with_routing_map(
    tokens: Tensor,
    routing_map: Tensor,
    *,
    probs: Optional[Tensor] = None,
    num_out_tokens: Optional[int] = None,
    drop_and_pad: bool = False,
) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """torch_npu `npu_moe_token_permute_with_routing_map`: `(permuted_tokens, permuted_probs, sorted_indices)`.

    Dropless: `num_out_tokens = T * K` (None means T), exactly K routed experts per token; `sorted_indices[t*K + j]`
    is the row holding the copy of token t for its j-th expert (ascending). Drop-and-pad: `C = num_out_tokens // E`
    rows per expert, `sorted_indices[e*C + c]` is the token in that row. `permuted_probs` is None without `probs`.
    """
    permuted, permuted_probs, sorted_indices = moe_token_permute_with_routing_map_op(
        tokens, routing_map, probs, num_out_tokens, drop_and_pad
    )
    return permuted, permuted_probs if probs is not None else None, sorted_indices


def moe_token_unpermute_with_routing_map(
    permuted_tokens: Tensor,
    sorted_indices: Tensor,
    restore_shape: Sequence[int],
    *,
    probs: Optional[Tensor] = None,
    routing_map: Optional[Tensor] = None,
    drop_and_pad: bool = False,
) -> Tensor:
    """torch_npu `npu_moe_token_unpermute_with_routing_map`: `out[t] = sum over copies of t of row * probs[t, e]`."""
    return moe_token_unpermute_with_routing_map_op(
        permuted_tokens, sorted_indices, list(restore_shape), probs, routing_map, drop_and_pad
    )


def permute(
    tokens: Tensor,
    routing_map: Tensor,
    probs: Optional[Tensor] = None,
    num_out_tokens: Optional[int] = None,
    fused: bool = False,
    drop_and_pad: bool = False,
) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """Megatron `moe_utils.permute`: `(permuted_tokens, permuted_probs, sorted_indices)`, same rows, same order.

    `sorted_indices` is the token id of each row (int64). With `num_out_tokens=None` the number of rows is
    `routing_map.sum()` (data-dependent under torch.compile); pass `T * topk` to keep shapes static. `fused` is
    accepted for call compatibility: this op is always fused.
    """
    del fused
    permuted, permuted_probs, sorted_indices = permute_op(tokens, routing_map, probs, num_out_tokens, drop_and_pad)
    return permuted, permuted_probs if probs is not None else None, sorted_indices


def unpermute(
    permuted_tokens: Tensor,
    sorted_indices: Tensor,
    restore_shape: Sequence[int],
    probs: Optional[Tensor] = None,
    routing_map: Optional[Tensor] = None,
    fused: bool = False,
    drop_and_pad: bool = False,
) -> Tensor:
    """Megatron `moe_utils.unpermute`: scatter-add rows back to their tokens, weighted by the dense `[T, E]` probs.

    Accumulates in float32 and rounds once (Megatron adds in the tokens' dtype when probs are None).
    """
    del fused
    return unpermute_op(permuted_tokens, sorted_indices, list(restore_shape), probs, routing_map, drop_and_pad)
