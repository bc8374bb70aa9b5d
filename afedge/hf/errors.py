"""The one error type of the Hugging Face import; messages name the file, field or key and what to do."""
from __future__ import annotations


class HFImportError(ValueError):
    """A checkpoint afedge cannot import: unsupported model type, remote code, bad weights, unreachable hub."""
