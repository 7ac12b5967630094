"""What happens to data that the CPU ops reject but device kernels do not check (that would cost a host sync).

The reference kernels are called directly, past validation: malformed routing must give outputs of the declared
shape, skip the invalid entries and never index outside a buffer. Device kernels must keep the same contract.
"""

from __future__ import annotations

import torch

from moe_inductor.reference import grouped_matmul, init_routing, multihot, permutation
from samples import rand


def test_multihot_skips_ids_below_minus_one():
    indices = torch.tensor([[0, -5], [3, 1]])
    routing_map, probs_map = multihot.indices_to_multihot(indices, torch.tensor([[0.5, 0.25], [0.75, 0.125]]), 3)
    assert routing_map.tolist() == [[True, False, False], [False, True, False]]
    assert probs_map.tolist() == [[0.5, 0.0, 0.0], [0.0, 0.125, 0.0]]


def test_npu_permute_with_wrong_experts_per_token():
    """Dropless with K=2, but token 0 routes to 3 experts and token 1 to one."""
    routing_map = torch.tensor([[1, 1, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    tokens = rand(3, 4)
    permuted, _, inverse = permutation.moe_token_permute_with_routing_map(tokens, routing_map, None, 6, False)
    assert permuted.shape == (6, 4) and inverse.shape == (6,)
    inverse = inverse.tolist()
    assert inverse[3] == -1  # token 1 has no second expert
    assert all(-1 <= r < 6 for r in inverse)
    out = permutation.moe_token_unpermute_with_routing_map(permuted, torch.tensor(inverse), (3, 4), None, None, False)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out[1], tokens[1])  # its one copy, the missing one skipped


def test_unpermute_skips_out_of_range_rows():
    permuted = rand(5, 3)
    sorted_indices = torch.tensor([0, 7, -3, 1, 1])
    out = permutation.unpermute(permuted, sorted_indices, (2, 3), None, None, False)
    torch.testing.assert_close(out, torch.stack([permuted[0], permuted[3] + permuted[4]]))


def test_finalize_skips_rows_past_the_buffer_and_unknown_experts():
    rows = rand(4, 3)
    bias = rand(2, 3, seed=1)
    row_idx = torch.tensor([0, 9, 3, -7])  # row-major, K=2
    experts = torch.tensor([[1, 0], [5, 1]])  # expert 5 has no bias row
    out = init_routing.moe_finalize_routing(rows, None, None, bias, None, row_idx, experts, 2, 2)
    torch.testing.assert_close(out, torch.stack([rows[0] + bias[1], rows[3]]))


def test_gmm_group_list_past_the_rows():
    x, w = rand(5, 2), rand(2, 2, 3, seed=1)
    out = grouped_matmul.gmm(x, w, None, torch.tensor([3, 9]), 0, True)
    assert out.shape == (5, 3)
    torch.testing.assert_close(out[3:], x[3:] @ w[1])
