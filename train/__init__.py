"""Training: build (recipe -> parts), the loop, optimizer, checkpoints, export, metrics."""
