"""The living catalogue on LanceDB: add, remove, update, search with a category filter, doctor, optimize.

``capret catalogue ...`` (:mod:`capret.cli.catalogue`) is the front end; ``capret serve --catalogue DIR`` serves
one. Modules: :mod:`.schema` (row, settings, hashes), :mod:`.table` (the LanceDB tables, indexes, lock),
:mod:`.stages` (detect -> caption -> embed), :mod:`.ingest` (add / update / re-embed, engines),
:mod:`.query` (search by photo), :mod:`.maintenance` (stats, doctor), :mod:`.ray_engine` (Ray Data).
LanceDB is an optional dependency (``pip install 'capret[catalogue]'``); it is imported when a catalogue is opened.
"""

from capret.catalogue.ingest import (
    add_images,
    create_engine,
    list_engines,
    reembed,
    update_caption,
    update_image,
)
from capret.catalogue.maintenance import doctor, stats
from capret.catalogue.query import CatalogueSearcher
from capret.catalogue.schema import NEAR_DUPLICATE_BITS, CatalogueSettings, dhash, hamming, model_fingerprint
from capret.catalogue.table import Catalogue, CatalogueError, SourceChangedError

__all__ = [
    "NEAR_DUPLICATE_BITS",
    "Catalogue",
    "CatalogueError",
    "CatalogueSearcher",
    "CatalogueSettings",
    "SourceChangedError",
    "add_images",
    "create_engine",
    "dhash",
    "doctor",
    "hamming",
    "list_engines",
    "model_fingerprint",
    "reembed",
    "stats",
    "update_caption",
    "update_image",
]
