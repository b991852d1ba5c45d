"""longctx: fine-tune Hugging Face decoder LLMs to 128K-1M token context.

Kept light on purpose (no torch import): the CLI and tools import it cheaply.
"""

__version__ = "0.1.0"
