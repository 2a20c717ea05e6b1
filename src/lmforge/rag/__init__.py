"""Retrieval-augmented generation: chunk documents, embed them, index, retrieve, and answer from them."""
