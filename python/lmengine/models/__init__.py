"""Model files and architectures: GGUF metadata, tensor loading, per-architecture definitions."""
