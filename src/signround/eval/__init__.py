"""Model evaluation: perplexity and KL divergence on fixed token windows (the protocol of shared/data/README.md)."""

from .ppl import mean_kl_divergence, perplexity, tokenize_file, windows

__all__ = ["mean_kl_divergence", "perplexity", "tokenize_file", "windows"]
