"""Interoperability: the official JAX checkpoints, exports to other libraries."""
