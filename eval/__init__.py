"""Long-context evaluation (passkey, perplexity by position) lands here."""
