"""Pure quantization math (no nn.Module, no I/O)."""
