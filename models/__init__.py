"""Decoder family and its Hugging Face bridge. Never imports torch.distributed."""
