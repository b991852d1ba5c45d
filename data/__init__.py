"""Data pipeline: sources, tokenisation, batching. Imports nothing else of longctx."""
