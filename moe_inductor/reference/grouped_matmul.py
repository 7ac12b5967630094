"""Plain-torch reference for grouped matmul (SPEC §5; MindSpeed `npu_gmm` / `npu_gmm_v2` semantics).

The only reference that loops: once per group (expert), never per token. It reads the group boundaries on the host,
which on an accelerator is a sync; the device kernels compute their tile map on the device instead.
"""

from __future__ import annotations

import torch

from ._rows import acc_dtype, scatter_add_rows

SPLIT_M, SPLIT_K = 0, 2


def group_ends(group_list: torch.Tensor, cumulative: bool) -> list[int]:
    """End offset of every group, from cumulative offsets (gmm) or per-group counts (gmm_v2)."""
    values = group_list.to(torch.int64)
    if not cumulative:
        values = values.cumsum(0)
    return values.tolist()


def gmm(x, weight, bias, group_list, group_type: int, cumulative: bool) -> torch.Tensor:
    acc = acc_dtype(x.dtype)
    ends = group_ends(group_list, cumulative)
    start = 0
    if group_type == SPLIT_M:
        # y[rows_g] = x[rows_g] @ weight[g] (+ bias[g]); rows past the last group stay zero.
        out = x.new_zeros((x.shape[0], weight.shape[2]))
        for g, end in enumerate(ends):
            if end > start:
                y = x[start:end].to(acc) @ weight[g].to(acc)
                if bias is not None:
                    y = y + bias[g].to(acc)
                out[start:end] = y.to(out.dtype)
            start = end
        return out
    # SPLIT_K: y[g] = x[:, ks_g] @ weight[ks_g, :]; an empty group gives zeros.
    out = x.new_zeros((len(ends), x.shape[0], weight.shape[1]))
    for g, end in enumerate(ends):
        if end > start:
            out[g] = (x[:, start:end].to(acc) @ weight[start:end].to(acc)).to(out.dtype)
        start = end
    return out


def group_of_rows(group_list: torch.Tensor, num_rows, cumulative: bool) -> torch.Tensor:
    """Group id of every row of a split-M gmm; rows past the last group get `G` (out of range)."""
    ends = group_list.to(torch.int64)
    if not cumulative:
        ends = ends.cumsum(0)
    rows = torch.arange(num_rows, device=group_list.device, dtype=torch.int64)
    return torch.searchsorted(ends, rows, right=True)


def bias_grad(grad_out: torch.Tensor, group_list: torch.Tensor, cumulative: bool, bias_dtype) -> torch.Tensor:
    """`dbias[g] = sum of grad_out over the rows of group g` (fp32 accumulation)."""
    groups = group_of_rows(group_list, grad_out.shape[0], cumulative)
    grad = scatter_add_rows(grad_out.to(acc_dtype(grad_out.dtype)), groups, group_list.shape[0])
    return grad.to(bias_dtype)
