"""capret's captioning package: a VLM/LLM dialogue (ChatCaptioner-style) writes a detailed caption for every
dataset item into a resumable JSONL store.

Parts: :mod:`captioning.loop` (the dialogue, batched), :mod:`captioning.prompts` (versioned prompt sets),
:mod:`captioning.backends` (``template``, ``transformers``, ``openai``; a registry), :mod:`captioning.store`
(the crash-safe store and :func:`read_captions`), :mod:`captioning.sources` (what to caption),
:mod:`captioning.runner` (batches, progress, failures) and :mod:`captioning.cli` (``capret-caption``).
"""

from captioning.store import CaptionStore, read_captions, read_records

__all__ = ["CaptionStore", "read_captions", "read_records"]
