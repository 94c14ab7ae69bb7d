"""Inference, one folder per job. Every module here reads exported model folders, never task configs.

- :mod:`.query`: the photo-to-shop-list path — :mod:`.query.pipeline` (detector -> captioner -> model -> index ->
  reranker), :mod:`.query.gallery` (an embedded shop gallery), :mod:`.query.captioner` (captions at query time);
- :mod:`.model_kinds`: :func:`capret.load`'s registry of model kinds — every exported folder's ``kind`` names the
  loader that opens it (dualstream, detector, combiner, phi, pic2word, lincir, clip);
- :mod:`.cir`: composed image retrieval — :mod:`.cir.benchmarks` (the FashionIQ / CIRR / CIRCO protocol:
  ``evaluate_cir``, used by ``capret-eval``, the Combiner's validation and the benches), :mod:`.cir.search`
  (composed queries, gallery search, reranking),
  :mod:`.cir.registry` / :mod:`.cir.methods` (every method behind one interface and the shortcut baselines),
  :mod:`.cir.inversion` / :mod:`.cir.inversion_methods` (SEARLE, SEARLE-OTI, Pic2Word, LinCIR),
  :mod:`.cir.oti` and :mod:`.cir.concepts` (optimisation-based inversion), :mod:`.cir.cirevl`
  (caption-then-rewrite), :mod:`.cir.combiner` (the ``combiner`` model folder), :mod:`.cir.features` (feature caches);
- :mod:`.dualstream`: the dual-stream retrieval model — :mod:`.dualstream.encoding` (``load_model``,
  ``encode_items``, ``evaluate_items``), the DeepFashion2 protocols (:mod:`.dualstream.detected`,
  :mod:`.dualstream.robustness`), :mod:`.dualstream.baselines` and :mod:`.dualstream.extract`;
- :mod:`.detectors`: the detector protocol, the model-free detectors and the trained clothing detector.
"""
