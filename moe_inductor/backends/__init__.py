"""Device and compiler backends: the `moe_inductor` torch.compile backend and the Ascend NPU dispatch."""
