"""Figures: reconstructions, attention maps, feature embeddings, run reports."""
