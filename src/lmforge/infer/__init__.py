"""Inference: the KV cache, sampling, and the generation loop every caller goes through."""
