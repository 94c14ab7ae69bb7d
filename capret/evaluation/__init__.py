"""Scoring retrieval: metrics as pure functions, and thin adapters for each benchmark's rules.

:mod:`.metrics` (mAP, MAP@R, R@k over scores or rankings, vectorised and chunked), :mod:`.retrieval_eval`
(embeddings + identity labels -> metrics, optionally after reranking), :mod:`.deepfashion2` (the official
consumer-to-shop protocol and the ground-truth-box variant), :mod:`.cir` (FashionIQ / CIRR / CIRCO metrics and
test-server files) and :mod:`.visualize` (result grids and recall curves). Nothing here loads a model.
"""
