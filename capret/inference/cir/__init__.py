"""Composed image retrieval: queries, methods, inversion, caption-then-rewrite, feature caches."""
