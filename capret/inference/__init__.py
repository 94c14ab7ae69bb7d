"""Inference: loading trained models of every task, embedding items and images, CIR search, feature caches.

- :mod:`.dualstream`: ``load_model`` -> :class:`~.dualstream.RetrievalModel`, ``encode_items``,
  ``evaluate_items`` (the ground-truth-box protocol on a DeepFashion2-layout split);
- :mod:`.loading`: ``load_cir_model`` (Combiner checkpoints);
- :mod:`.cir`: composed queries, gallery search and reranking for FashionIQ / CIRR / CIRCO;
- :mod:`.feature_cache`: safetensors caches of CLIP features keyed by model, preprocessing and names;
- :mod:`.cir_registry` / :mod:`.cir_methods`: every CIR method behind one interface (``create_cir_method``),
  the shortcut baselines and ``search_methods``; :mod:`.zeroshot_methods` (SEARLE, SEARLE-OTI, Pic2Word,
  LinCIR) and :mod:`.cirevl` (caption-then-rewrite, cached in a caption store) register into it.
"""
