"""File containers shared by models and tokenizers (GGUF and ggml's block formats)."""
