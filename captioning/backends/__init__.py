"""Caption backends behind one interface, chosen by name.

A backend plays both roles of the dialogue: ``ask`` runs the text-only LLM (next question, summary) and
``answer`` runs the VLM that sees the item. Both take a whole batch, so one call serves every item of a batch
in a round (batched ``generate`` for local models, concurrent requests for servers), and both return one
:class:`~captioning.types.Generation` per request, carrying token usage and, for a request that failed,
an error instead of raising (one bad item must not lose a batch).

Built-in backends: ``template`` (no model), ``transformers`` (local VLM + chat LLM), ``openai`` (any
OpenAI-compatible chat-completions server). New ones are added with :func:`register_backend`.
"""

from __future__ import annotations

# Importing the built-in backends registers them (their heavy dependencies are imported lazily inside them).
from captioning.backends import openai_backend, template, transformers_backend  # noqa: F401
from captioning.backends.base import CaptionBackend, create_backend, list_backends, register_backend

__all__ = ["CaptionBackend", "create_backend", "list_backends", "register_backend"]
