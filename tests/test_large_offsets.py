"""Buffers past 2**31 elements: row maps and gathers index in 64 bits (int8 rows keep it to a few GB)."""

from __future__ import annotations

import pytest
import torch

from moe_inductor import ops

HIDDEN = 2**15
TOKENS = 2**16 + 3  # TOKENS * HIDDEN > 2**31


@pytest.mark.slow
def test_permute_and_init_routing_past_2_31_elements():
    assert TOKENS * HIDDEN > 2**31
    tokens = torch.empty(TOKENS, HIDDEN, dtype=torch.int8)
    tokens[:, 0] = torch.arange(TOKENS) % 127  # a token's first byte names it; the rest is left as allocated
    tokens[:, -1] = -(torch.arange(TOKENS) % 127)
    # Two experts: expert 1 takes the last 5 tokens, expert 0 the rest, so expert 1's rows sit past 2**31 elements.
    routing_map = torch.zeros(TOKENS, 2, dtype=torch.bool)
    routing_map[:-5, 0] = True
    routing_map[-5:, 1] = True

    permuted, _, sorted_indices = ops.moe_token_permute_with_routing_map(tokens, routing_map, num_out_tokens=TOKENS)
    assert torch.equal(sorted_indices[-5:], torch.arange(TOKENS - 5, TOKENS, dtype=torch.int32))
    assert torch.equal(permuted[-5:], tokens[-5:])
    assert torch.equal(permuted[:3], tokens[:3])
    del permuted

    expert_idx = routing_map.to(torch.int32).argmax(1, keepdim=True).to(torch.int32)
    expanded_x, row_idx, counts, _ = ops.moe_init_routing_v2(
        tokens, expert_idx, expert_num=2, expert_tokens_num_flag=True, expert_tokens_num_type=1
    )
    assert counts.tolist() == [TOKENS - 5, 5]
    assert torch.equal(expanded_x[-5:], tokens[-5:])
    assert row_idx[-1] == TOKENS - 1
