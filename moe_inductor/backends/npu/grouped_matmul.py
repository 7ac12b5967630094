"""gmm / gmm_v2 on `torch_npu.npu_grouped_matmul` (the functions of `moe_inductor.reference.grouped_matmul`).

Split M (group_type 0) is one call with single tensors in and out (`split_item=3`). Translations:

* `group_list_type` says what `group_list` holds: 0 for cumulative ends (gmm), 1 for per-group counts (gmm_v2). The
  NPU rejects a count list of length 1, so one group is passed as its (equal) cumulative end.
* The NPU needs the groups to cover every row of `x`; ours leave rows past the last group zero. We stretch the last
  group to the end of `x` and zero those rows of the result (device-side, no host sync).
* Bias must be float32 for bfloat16 `x` and `x`'s dtype otherwise.

Split K (group_type 2, the weight gradient) is documented as unsupported by `npu_grouped_matmul` on Atlas A2/A3, so
it runs the plain-torch reference on the device (one matmul per group, one host sync for the group ends).
"""

from __future__ import annotations

import torch

from ...reference import grouped_matmul as ref
from ...reference.grouped_matmul import bias_grad, group_ends, group_of_rows
from ._native import native, torch_npu

__all__ = ["bias_grad", "gmm", "group_ends", "group_of_rows"]

_BIAS_DTYPE = {torch.bfloat16: torch.float32, torch.float16: torch.float16, torch.float32: torch.float32}


def gmm(x, weight, bias, group_list, group_type: int, cumulative: bool) -> torch.Tensor:
    if group_type != ref.SPLIT_M or not native(x, weight):
        return ref.gmm(x, weight, bias, group_list, group_type, cumulative)
    num_rows = x.shape[0]
    groups = group_list.to(torch.int64)
    single = groups.shape[0] == 1
    total = groups[-1] if cumulative or single else groups.sum()
    end = groups.new_full((1,), num_rows)
    if cumulative or single:  # cumulative ends, the last one moved to the end of x
        npu_groups, list_type = torch.cat([groups[:-1], end]), 0
    else:  # counts, the last one grown by the rows past the last group
        npu_groups, list_type = torch.cat([groups[:-1], end - groups[:-1].sum()]), 1
    (y,) = torch_npu().npu_grouped_matmul(
        [x],
        [weight],
        bias=[bias.to(_BIAS_DTYPE[x.dtype])] if bias is not None else None,
        group_list=npu_groups,
        split_item=3,
        group_type=0,
        group_list_type=list_type,
    )
    rows = torch.arange(num_rows, device=x.device).unsqueeze(-1)
    return torch.where(rows < total, y, torch.zeros((), dtype=y.dtype, device=y.device))
