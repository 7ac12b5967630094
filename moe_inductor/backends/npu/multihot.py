"""indices_to_multihot / multihot_to_indices on the NPU: torch_npu has no kernel for these, and the plain-torch
reference (one scatter or gather each) runs on the device as it is."""

from ...reference.multihot import (
    indices_to_multihot,
    indices_to_multihot_backward,
    multihot_to_indices,
    multihot_to_indices_backward,
    position_map_from_indices,
)

__all__ = [
    "indices_to_multihot",
    "indices_to_multihot_backward",
    "multihot_to_indices",
    "multihot_to_indices_backward",
    "position_map_from_indices",
]
