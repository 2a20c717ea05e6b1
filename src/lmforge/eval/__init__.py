"""Scoring models: perplexity on held-out text (more tasks to come)."""
