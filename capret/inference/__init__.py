"""Inference: loading trained models of every task, embedding items and images, CIR search, feature caches.

- :mod:`.dualstream`: ``load_model`` -> :class:`~.dualstream.RetrievalModel`, ``encode_items``,
  ``evaluate_items`` (the ground-truth-box protocol on a DeepFashion2-layout split);
- :mod:`.loading`: ``load_cir_model`` (Combiner checkpoints);
- :mod:`.cir`: composed queries, gallery search and reranking for FashionIQ / CIRR / CIRCO;
- :mod:`.feature_cache`: safetensors caches of CLIP features keyed by model, preprocessing and names.
"""
