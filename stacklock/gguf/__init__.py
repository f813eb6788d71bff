"""GGUF model files: the header reader, the header summary and the tokenizer fingerprint (never the weights)."""
