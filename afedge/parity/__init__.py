"""Parity: every runtime against the PyTorch reference."""
