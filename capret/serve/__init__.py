"""``capret serve``: a web page and JSON API for caption-augmented and composed retrieval.

:mod:`.backends` wraps a query pipeline (and optional composed-query methods) with the gallery addressed by id;
:mod:`.app` builds the FastAPI app (page, API, limits). ``capret serve --pipeline DIR`` runs it with uvicorn.
"""

from capret.serve.app import create_app, serve
from capret.serve.backends import ServeBackend

__all__ = ["ServeBackend", "create_app", "serve"]
