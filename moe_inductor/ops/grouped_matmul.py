"""gmm / gmm_v2: grouped matmul, the experts of an MoE layer as one op (SPEC §5, MindSpeed `npu_gmm`).

`gmm` takes cumulative end offsets, `gmm_v2` per-group counts; everything else is shared. group_type 0 splits the
rows of `x` (forward and dx); group_type 2 splits the contraction axis (the weight gradient). The backward of each
type is expressed with the op itself, so whatever kernel a device registers also serves the backward:

    type 0: dx = gmm(dy, W^T) (type 0),   dW = gmm(x^T, dy) (type 2),   dbias[g] = sum of dy over group g
    type 2: dx = gmm(W, dy^T)^T (type 0), dW = gmm(x^T, dy) (type 0)
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..reference import grouped_matmul as ref
from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check, check_same_device, check_shape, check_tensor, on_cpu
from ._registry import backend, define, use_triton

GroupList = Union[Tensor, Sequence[int]]


def _check_gmm(op: str, x, weight, bias, group_list, group_type) -> None:
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check(
        group_type in (ref.SPLIT_M, ref.SPLIT_K),
        f"{op}: 'group_type' must be 0 (split M) or 2 (split K), got {group_type} (1, split N, is not supported)",
    )
    check_tensor(op, "group_list", group_list, ndim=1, dtypes=INDEX_DTYPES)
    num_groups = group_list.shape[0]
    check(num_groups > 0, f"{op}: 'group_list' must name at least one group")
    if group_type == ref.SPLIT_M:
        check_tensor(op, "weight", weight, ndim=3, dtypes=(x.dtype,))
        check(
            weight.shape[1] == x.shape[1],
            f"{op}: 'weight' must be [G, K, N] with K = x.shape[1] = {x.shape[1]}, got {tuple(weight.shape)}",
        )
        check(
            num_groups == weight.shape[0],
            f"{op}: len(group_list) = {num_groups} but 'weight' has G = {weight.shape[0]} groups",
        )
        if bias is not None:
            check_tensor(op, "bias", bias, ndim=2, dtypes=(x.dtype, torch.float32))
            check_shape(op, "bias", bias, (weight.shape[0], weight.shape[2]), "[G, N]")
    else:
        check_tensor(op, "weight", weight, ndim=2, dtypes=(x.dtype,))
        check(
            weight.shape[0] == x.shape[1],
            f"{op}: group_type=2 needs 'weight' [K, N] with K = x.shape[1] = {x.shape[1]}, got {tuple(weight.shape)}",
        )
        check(bias is None, f"{op}: 'bias' is only supported with group_type=0")
    check_same_device(op, x=x, weight=weight, bias=bias, group_list=group_list)


def _check_group_values(op: str, group_list: Tensor, bound: int, axis: str, cumulative: bool) -> None:
    """CPU data checks: offsets non-decreasing / counts non-negative, and the total within the split axis."""
    values = group_list.to(torch.int64)
    if cumulative:
        steps = torch.diff(values, prepend=values.new_zeros(1))
        if bool((steps < 0).any()):
            raise ValueError(
                f"{op}: 'group_list' (cumulative offsets) must be non-negative and non-decreasing, got "
                f"{values.tolist()}"
            )
        total = int(values[-1])
    else:
        if bool((values < 0).any()):
            raise ValueError(f"{op}: 'group_list' (per-group counts) must be non-negative, got {values.tolist()}")
        total = int(values.sum())
    check(
        total <= bound,
        f"{op}: 'group_list' covers {total} {axis} but x has only {bound} (groups must fit inside x; rows past "
        f"the last group are left zero)",
    )


def _define_gmm(name: str, cumulative: bool):
    # Decomposed under torch.compile on CUDA (our Triton kernels, or aten._grouped_mm which Inductor lowers with its
    # grouped-GEMM template); opaque elsewhere, because the reference reads the group bounds on the host.
    @define(
        f"{name}(Tensor x, Tensor weight, Tensor? bias, Tensor group_list, int group_type) -> Tensor",
        traceable=lambda x, *rest: use_triton(x),
    )
    def gmm_op(x, weight, bias, group_list, group_type):
        _check_gmm(name, x, weight, bias, group_list, group_type)
        if on_cpu(group_list):
            bound, axis = (x.shape[0], "rows") if group_type == ref.SPLIT_M else (x.shape[1], "columns")
            _check_group_values(name, group_list, bound, axis, cumulative)
        return backend(x).grouped_matmul.gmm(x, weight, bias, group_list, group_type, cumulative)

    @gmm_op.register_fake
    def _(x, weight, bias, group_list, group_type):
        _check_gmm(name, x, weight, bias, group_list, group_type)
        if group_type == ref.SPLIT_M:
            return x.new_empty((x.shape[0], weight.shape[2]))
        return x.new_empty((group_list.shape[0], x.shape[0], weight.shape[1]))

    def setup(ctx, inputs, output):
        x, weight, bias, group_list, group_type = inputs
        ctx.save_for_backward(x, weight, group_list)
        ctx.group_type = group_type
        ctx.bias_dtype = bias.dtype if bias is not None else None

    def backward(ctx, grad):
        x, weight, group_list = ctx.saved_tensors
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_bias = None
        if ctx.group_type == ref.SPLIT_M:
            if need_x:
                grad_x = gmm_op(grad, weight.transpose(-1, -2), None, group_list, ref.SPLIT_M)
            if need_w:
                grad_w = gmm_op(x.t(), grad, None, group_list, ref.SPLIT_K)
            if need_bias and ctx.bias_dtype is not None:
                grad_bias = backend(grad).grouped_matmul.bias_grad(grad, group_list, cumulative, ctx.bias_dtype)
        else:
            if need_x:
                grad_x = gmm_op(weight, grad.transpose(1, 2), None, group_list, ref.SPLIT_M).t()
            if need_w:
                grad_w = gmm_op(x.t(), grad, None, group_list, ref.SPLIT_M)
        return grad_x, grad_w, grad_bias, None, None

    gmm_op.register_autograd(backward, setup_context=setup)
    return gmm_op


gmm_op = _define_gmm("gmm", cumulative=True)
gmm_v2_op = _define_gmm("gmm_v2", cumulative=False)


def _as_group_tensor(op: str, group_list: Optional[GroupList], x: Tensor) -> Tensor:
    if group_list is None:
        raise ValueError(f"{op}: 'group_list' is required")
    if isinstance(group_list, Tensor):
        return group_list
    # A Python list: one small host-to-device copy. Pass a tensor to avoid it.
    return torch.tensor(list(group_list), dtype=torch.int64, device=x.device)


def _call(name, op, x, weight, bias, group_list, group_type, gemm_fusion, original_weight) -> Tensor:
    if gemm_fusion or original_weight is not None:
        raise NotImplementedError(
            f"{name}: gemm_fusion / original_weight (accumulating dW into original_weight.main_grad) are not "
            f"supported; add the returned weight gradient to main_grad yourself"
        )
    return op(x, weight, bias, _as_group_tensor(name, group_list, x), group_type)


def gmm(
    x: Tensor,
    weight: Tensor,
    *,
    bias: Optional[Tensor] = None,
    group_list: Optional[GroupList] = None,
    group_type: int = 0,
    gemm_fusion: bool = False,
    original_weight: Optional[Tensor] = None,
) -> Tensor:
    """MindSpeed `npu_gmm`: grouped matmul with `group_list` = cumulative end offsets (list of ints or tensor).

    group_type 0: `x[M, K] @ weight[G, K, N]` per row group -> `[M, N]` (weight may be a transposed `[G, N, K]`);
    group_type 2: `x[:, ks_g] @ weight[ks_g, :]` per slice of K -> `[G, M, N]`.
    """
    return _call("gmm", gmm_op, x, weight, bias, group_list, group_type, gemm_fusion, original_weight)


def gmm_v2(
    x: Tensor,
    weight: Tensor,
    *,
    bias: Optional[Tensor] = None,
    group_list: Optional[GroupList] = None,
    group_type: int = 0,
    gemm_fusion: bool = False,
    original_weight: Optional[Tensor] = None,
) -> Tensor:
    """MindSpeed `npu_gmm_v2`: as `gmm`, with `group_list` = per-group sizes (e.g. moe_init_routing_v2 counts)."""
    return _call("gmm_v2", gmm_v2_op, x, weight, bias, group_list, group_type, gemm_fusion, original_weight)
