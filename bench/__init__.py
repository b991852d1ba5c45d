"""Benchmarks: one program per figure, JSON out."""
