"""Rank-free math: attention, the loss head, capability probes. Never imports torch.distributed."""

