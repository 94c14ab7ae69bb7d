"""Inference, one folder per job. Every module here reads exported model folders, never task configs.

- :mod:`.query`: the photo-to-shop-list path — :mod:`.query.pipeline` (detector -> captioner -> model -> index ->
  reranker), :mod:`.query.gallery` (an embedded shop gallery), :mod:`.query.captioner` (captions at query time);
- :mod:`.cir`: composed image retrieval — :mod:`.cir.search` (composed queries, gallery search, reranking),
  :mod:`.cir.registry` / :mod:`.cir.methods` (every method behind one interface and the shortcut baselines),
  :mod:`.cir.inversion` / :mod:`.cir.inversion_methods` (SEARLE, SEARLE-OTI, Pic2Word, LinCIR),
  :mod:`.cir.oti` and :mod:`.cir.concepts` (optimisation-based inversion), :mod:`.cir.cirevl`
  (caption-then-rewrite), :mod:`.cir.combiner` (Combiner checkpoints), :mod:`.cir.features` (feature caches);
- :mod:`.dualstream`: the dual-stream retrieval model — :mod:`.dualstream.encoding` (``load_model``,
  ``encode_items``, ``evaluate_items``), the DeepFashion2 protocols (:mod:`.dualstream.detected`,
  :mod:`.dualstream.robustness`), :mod:`.dualstream.baselines` and :mod:`.dualstream.extract`;
- :mod:`.detectors`: the detector protocol, the model-free detectors and the trained clothing detector.
"""
