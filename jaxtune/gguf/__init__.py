"""GGUF files: reading (tensors, tokenizer, config) and the per-family key tables."""
