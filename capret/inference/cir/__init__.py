"""Composed image retrieval: the benchmarks' protocol (``benchmarks.evaluate_cir``), queries, methods, inversion,
caption-then-rewrite, the Combiner and mapper model folders, feature caches."""
