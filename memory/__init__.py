"""Activation memory: recompute, offload (MEMO), accounting, planning. Device-neutral."""
