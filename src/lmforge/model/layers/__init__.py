"""The building blocks of a transformer block, one concept per module."""
