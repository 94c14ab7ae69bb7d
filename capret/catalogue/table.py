"""The catalogue itself: a LanceDB database (a local folder or an object-store URI) holding one row per item.

Layout (a LanceDB database, so the same code opens ``/data/shop`` and ``s3://bucket/shop``)::

    DIR/items.lance      the rows (schema in :mod:`capret.catalogue.schema`), their vector and scalar indexes
    DIR/settings.lance   one row: the catalogue's :class:`~capret.catalogue.schema.CatalogueSettings` as JSON
    DIR/captions.jsonl   the caption store of the captioner (local folders; object stores keep it in the cache)

**Writes are whole batches.** Every change (an added batch, a removal, an update) is one Lance commit: a new
table version is published atomically after its data files are written, so a process killed mid-write leaves
the previous version, which opens, plus unreferenced files that ``optimize`` deletes. **One writer at a time**:
every writing method holds :func:`capret.locks.exclusive_output` on the catalogue (for an object-store URI, on
a lock file in the local cache, which serialises the writers of this machine only). Readers never lock.

**The index.** Below ``index_threshold`` rows the search is exact (a flat scan, which Lance also uses for rows
not yet indexed). From the threshold on, ``optimize`` trains IVF-PQ (inner product) on the vectors and queries
probe ``nprobes`` partitions and re-score ``k * refine_factor`` candidates with the full vectors. Later adds are
searched exactly until ``optimize`` folds them into the index; once the table has grown to twice the rows the
index was trained on, the index is *stale* and ``optimize`` retrains it. ``category``, ``id``, ``image`` and
``image_sha256`` carry scalar indexes, so a category filter is applied before the vector search (prefilter)
and duplicate checks do not scan.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from capret.catalogue.schema import ITEMS_TABLE, SETTINGS_TABLE, CatalogueSettings, row_schema
from capret.errors import CapretError, ConfigError, DataError, MissingDependencyError, MissingImageError
from capret.io import cache_dir, file_sha256

__all__ = ["VECTOR_INDEX", "Catalogue", "CatalogueError", "SourceChangedError", "is_uri", "sql_string"]

VECTOR_INDEX = "vector_idx"
#: scalar indexes: category filters before the vector search; id / image / sha lookups during adds and removes
SCALAR_INDEXES = {"category": "bitmap", "id": "btree", "image": "btree", "image_sha256": "btree"}
#: IVF-PQ needs 256 training rows per PQ codebook (8-bit codes); below that the search stays exact
MIN_IVF_ROWS = 256


class CatalogueError(CapretError):
    """A catalogue is missing, of another model, or asked for something it cannot do."""


class SourceChangedError(CatalogueError):
    """A row's source photo no longer has the SHA-256 stored in the row: it was edited, replaced or corrupted
    after it was added, so its stored box, caption and vector describe other bytes. Reading it on would embed or
    show a photo the row does not describe; the message names the file and the row id."""


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for object-store URIs (``s3://``, ``gs://``, ``az://``, ``memory://``); False for local paths."""
    return "://" in str(location)


def sql_string(value: str) -> str:
    """``value`` as a SQL string literal for a Lance filter (quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def _lancedb() -> Any:
    try:
        import lancedb
    except ImportError:
        raise MissingDependencyError(
            "the catalogue needs LanceDB: pip install 'capret[catalogue]' (or pip install lancedb)"
        ) from None
    return lancedb


def _in_list(column: str, values: Sequence[str]) -> str:
    return f"{column} IN (" + ", ".join(sql_string(v) for v in values) + ")"


@dataclass(eq=False, repr=False)
class Catalogue:
    """An opened catalogue: settings, the items table, and every operation on them (see the module docstring).

    Built by :meth:`create` and :meth:`open` (which connect and check the tables); the fields are what they found.
    """

    location: str
    _: KW_ONLY
    db: Any
    items: Any
    settings_table: Any
    settings: CatalogueSettings
    storage_options: dict[str, str]

    # ------------------------------------------------------------------------------------------ opening

    @staticmethod
    def _connect(location: str, storage_options: dict[str, str] | None) -> Any:
        return _lancedb().connect(location, storage_options=dict(storage_options or {}) or None)

    @classmethod
    def create(
        cls,
        location: str | os.PathLike[str],
        *,
        settings: CatalogueSettings,
        storage_options: dict[str, str] | None = None,
    ) -> Catalogue:
        """A new, empty catalogue at ``location``; an existing catalogue there is an error (never replaced)."""
        location = str(location)
        with _writer_lock(location):
            db = cls._connect(location, storage_options)
            names = set(_table_names(db))
            if ITEMS_TABLE in names or SETTINGS_TABLE in names:
                raise CatalogueError(
                    f"a catalogue already exists at {location}; open it or choose another folder"
                )
            with _quiet():
                settings_table = db.create_table(
                    SETTINGS_TABLE, schema=pa.schema([("name", pa.string()), ("value", pa.string())])
                )
            catalogue = cls(
                location,
                db=db,
                items=None,
                settings_table=settings_table,
                settings=settings,
                storage_options=dict(storage_options or {}),
            )
            catalogue.save_settings()
            with _quiet():  # the items table last: a catalogue is complete once it exists
                catalogue.items = db.create_table(ITEMS_TABLE, schema=row_schema(settings.dim))
        return catalogue

    @classmethod
    def open(
        cls,
        location: str | os.PathLike[str],
        *,
        storage_options: dict[str, str] | None = None,
        root: str | os.PathLike[str] | None = None,
    ) -> Catalogue:
        """Open the catalogue at ``location``; ``root`` overrides the declared root of the source photos."""
        location = str(location)
        if not is_uri(location) and not Path(location).is_dir():
            raise CatalogueError(
                "no catalogue here (the folder does not exist); create one with `capret catalogue create`",
                path=location,
            )
        db = cls._connect(location, storage_options)
        names = set(_table_names(db))
        if ITEMS_TABLE not in names or SETTINGS_TABLE not in names:
            raise CatalogueError(
                f"{location} is not a catalogue (no {ITEMS_TABLE!r} and {SETTINGS_TABLE!r} tables); "
                "create one with `capret catalogue create`"
            )
        settings_table = db.open_table(SETTINGS_TABLE)
        rows = settings_table.search().where("name = 'catalogue'").limit(None).to_arrow().to_pylist()
        if len(rows) != 1:
            raise DataError(f"catalogue settings hold {len(rows)} records, expected 1", path=location)
        settings = CatalogueSettings.from_json(rows[0]["value"], where=f"{location}/{SETTINGS_TABLE}")
        if root is not None:
            settings.root = str(Path(root).resolve())
        return cls(
            location,
            db=db,
            items=db.open_table(ITEMS_TABLE),
            settings_table=settings_table,
            settings=settings,
            storage_options=dict(storage_options or {}),
        )

    def save_settings(self) -> None:
        """Publish the settings (one commit: the row is replaced in place)."""
        record = pa.table({"name": ["catalogue"], "value": [self.settings.to_json()]})
        builder = self.settings_table.merge_insert("name").when_matched_update_all()
        builder.when_not_matched_insert_all().execute(record)

    def refresh(self) -> None:
        """See the latest version (another process may have written since this one opened)."""
        self.items.checkout_latest()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the catalogue's one-writer lock and work on its latest version."""
        with _writer_lock(self.location):
            self.refresh()
            yield

    @property
    def caption_cache(self) -> Path:
        """The captioner's caption store: inside a local catalogue, else in the cache (one per URI)."""
        if is_uri(self.location):
            digest = hashlib.sha256(self.location.encode()).hexdigest()[:16]
            return cache_dir("catalogue", digest, "captions.jsonl")
        return Path(self.location) / "captions.jsonl"

    def source_path(self, relative: str) -> Path:
        """Where the source photo of a row lies (its stored path under the declared root)."""
        return Path(self.settings.root) / relative

    def verified_source(self, row: dict[str, Any], *, verify: bool = True) -> Path:
        """The source photo of ``row`` (needs ``id``, ``image``, ``image_sha256``), checked against the row.

        Every reader of a source photo goes through here, so a photo changed since it was added is refused
        instead of being re-embedded or served under the old row. ``verify=False`` (``--no-verify``) skips the
        hash; the caller says so to the user.

        Raises:
            MissingImageError: the photo is no longer under the root.
            SourceChangedError: its SHA-256 is not the row's.
        """
        path = self.source_path(row["image"])
        if not verify:
            return path
        if not path.is_file():
            raise MissingImageError(
                f"source photo of catalogue row {row['id']!r} is missing under root {self.settings.root}",
                path=path,
            )
        actual = file_sha256(path)
        if actual != row["image_sha256"]:
            raise SourceChangedError(
                f"source photo of catalogue row {row['id']!r} changed since it was added (SHA-256 "
                f"{actual[:12]}... on disk, {str(row['image_sha256'])[:12]}... in the row); give the item its "
                "photo again with `capret catalogue update DIR --id ID --image PHOTO`, or pass --no-verify",
                path=path,
            )
        return path

    # ------------------------------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return int(self.items.count_rows())

    def scan(self, columns: Sequence[str], *, where: str | None = None) -> pa.Table:
        """``columns`` of every row (matching ``where``), without the vectors unless asked for."""
        query = self.items.search().select(list(columns)).limit(None)
        if where:
            query = query.where(where)
        return query.to_arrow()

    def rows(self, ids: Sequence[str], *, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The rows with these ids (any order); unknown ids are simply absent."""
        out: list[dict[str, Any]] = []
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            query = self.items.search().where(_in_list("id", chunk)).limit(None)
            if columns is not None:
                query = query.select(list(columns))
            out.extend(query.to_arrow().to_pylist())
        return out

    def categories(self) -> dict[str, int]:
        """Rows per category (null category counted under ``""``)."""
        values = self.scan(["category"]).column("category").to_pylist()
        counts: dict[str, int] = {}
        for value in values:
            counts[value or ""] = counts.get(value or "", 0) + 1
        return dict(sorted(counts.items()))

    def has_vector_index(self) -> bool:
        return any(getattr(ix, "name", None) == VECTOR_INDEX for ix in self.items.list_indices())

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        *,
        category: str | None = None,
        with_vectors: bool = False,
        exact: bool = False,
        nprobes: int | None = None,
        refine_factor: int | None = None,
    ) -> list[list[dict[str, Any]]]:
        """Top-``k`` rows per query vector (inner product, best first), each with its ``score``.

        ``category`` prefilters with the scalar index (the k results all have that category whenever k exist);
        ``exact`` bypasses the IVF-PQ index (the reference for recall). Rows hold every column except the
        vector, unless ``with_vectors``.
        """
        if int(k) < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        queries = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if queries.shape[1] != self.settings.dim:
            raise CatalogueError(
                f"query vectors are {queries.shape[1]}-d, the catalogue holds {self.settings.dim}-d"
            )
        columns = [n for n in row_schema(self.settings.dim).names if with_vectors or n != "vector"]
        indexed = not exact and self.has_vector_index()
        results = []
        for query_vector in queries:
            query = self.items.search(query_vector, vector_column_name="vector").distance_type("dot")
            query = query.select([*columns, "_distance"]).limit(int(k))
            if category is not None:
                query = query.where(f"category = {sql_string(category)}", prefilter=True)
            if indexed:
                query = query.nprobes(int(nprobes or self.settings.nprobes)).refine_factor(
                    int(refine_factor or self.settings.refine_factor)
                )
            elif exact:
                query = query.bypass_vector_index()
            hits = query.to_arrow().to_pylist()
            for hit in hits:  # Lance's "dot" distance is 1 - <q, x>
                hit["score"] = 1.0 - float(hit.pop("_distance"))
            results.append(hits)
        return results

    # ------------------------------------------------------------------------------------------ writing

    def add_rows(self, rows: pa.Table) -> int:
        """Append a batch of rows as one commit (the caller holds :meth:`writing`); returns the rows added.

        Rows of another model fingerprint are refused: their vectors live in another space, and mixed rows
        would rank by accident.
        """
        if rows.num_rows == 0:
            return 0
        fingerprints = set(rows.column("model_fingerprint").to_pylist())
        if fingerprints != {self.settings.fingerprint}:
            other = sorted(fingerprints - {self.settings.fingerprint})
            raise CatalogueError(
                f"rows embedded by model fingerprint(s) {other} refused: this catalogue embeds with "
                f"{self.settings.fingerprint} ({self.settings.model}); re-embed with "
                "`capret catalogue update DIR --reembed --model M` to change models"
            )
        self.items.add(rows.select(row_schema(self.settings.dim).names).cast(row_schema(self.settings.dim)))
        return int(rows.num_rows)

    def replace_rows(self, rows: pa.Table) -> int:
        """Overwrite the rows with these ids (one commit); ids not in the catalogue are an error."""
        if rows.num_rows == 0:
            return 0
        ids = rows.column("id").to_pylist()
        known = {r["id"] for r in self.rows(ids, columns=["id"])}
        missing = [i for i in ids if i not in known]
        if missing:
            raise CatalogueError(f"no item {missing[0]!r} in the catalogue {self.location}")
        builder = self.items.merge_insert("id").when_matched_update_all()
        builder.execute(rows.cast(row_schema(self.settings.dim)))
        return int(rows.num_rows)

    def remove(self, *, ids: Sequence[str] = (), images: Sequence[str] = ()) -> int:
        """Delete items by id and every item of the photos ``images`` (relative paths); one commit per
        500 values. Returns the rows removed."""
        before = len(self)
        for column, values in (("id", list(ids)), ("image", list(images))):
            for start in range(0, len(values), 500):
                self.items.delete(_in_list(column, values[start : start + 500]))
        return before - len(self)

    # ------------------------------------------------------------------------------------------ maintenance

    def index_state(self) -> dict[str, Any]:
        """What the indexes cover: kind, rows indexed / not yet, staleness, scalar indexes present."""
        rows = len(self)
        indexes = {getattr(ix, "name", ""): ix for ix in self.items.list_indices()}
        state: dict[str, Any] = {"rows": rows, "threshold": self.settings.index_threshold}
        if VECTOR_INDEX in indexes:
            stats = self.items.index_stats(VECTOR_INDEX)
            trained = self.settings.index_trained_rows
            state.update(
                kind="ivf_pq",
                indexed_rows=int(stats.num_indexed_rows),
                unindexed_rows=int(stats.num_unindexed_rows),
                trained_rows=trained,
                stale=bool(rows < self._ivf_floor() or (trained and rows > 2 * trained)),
            )
        else:
            state.update(kind="exact", indexed_rows=0, unindexed_rows=0, stale=rows >= self._ivf_floor())
        scalar: dict[str, int | None] = {}
        for column in SCALAR_INDEXES:
            name = f"{column}_idx"
            if name in indexes:
                stats = self.items.index_stats(name)
                scalar[column] = int(stats.num_unindexed_rows) if stats is not None else 0
            else:
                scalar[column] = None
        state["scalar_unindexed"] = scalar
        return state

    def _ivf_floor(self) -> int:
        return max(int(self.settings.index_threshold), MIN_IVF_ROWS)

    def ivf_shape(self, rows: int) -> tuple[int, int]:
        """``(partitions, sub-vectors)`` of the IVF-PQ for ``rows`` rows: about 4,000 rows per partition (so
        ``nprobes`` partitions scan a fixed few percent at 1M), 8 dimensions per PQ sub-vector."""
        partitions = int(min(4096, max(1, round(rows / 4000))))
        dim = self.settings.dim
        sub = max(1, dim // 8)
        while dim % sub:
            sub -= 1
        return partitions, sub

    def optimize(self, *, rebuild: bool = False, older_than: float = 0.0) -> dict[str, Any]:
        """Bring the indexes up to date and clean old versions; returns what was done.

        IVF-PQ is (re)trained when the table reaches the threshold, when it is stale, or on ``rebuild``; it is
        dropped when the table shrank below the threshold (exact search is then both right and fast). New rows
        are folded into existing indexes and small data files compacted; versions older than ``older_than``
        seconds are deleted (0: all but the latest -- a server reading an older version must reopen).
        """
        from lancedb.index import Bitmap, BTree, IvfPq

        done: list[str] = []
        with self.writing():
            rows = len(self)
            state = self.index_state()
            if rows >= self._ivf_floor() and (rebuild or state["kind"] == "exact" or state["stale"]):
                partitions, sub = self.ivf_shape(rows)
                with _quiet():
                    self.items.create_index(
                        "vector",
                        config=IvfPq(distance_type="dot", num_partitions=partitions, num_sub_vectors=sub),
                        replace=True,
                        name=VECTOR_INDEX,
                    )
                self.settings.index_trained_rows = rows
                self.save_settings()
                done.append(f"trained IVF-PQ ({partitions} partitions, {sub} sub-vectors) on {rows} rows")
            elif rows < self._ivf_floor() and state["kind"] == "ivf_pq":
                self.items.drop_index(VECTOR_INDEX)
                self.settings.index_trained_rows = 0
                self.save_settings()
                done.append(f"dropped IVF-PQ: {rows} rows is below the threshold, search is exact")
            if rows:
                configs = {"bitmap": Bitmap, "btree": BTree}
                for column, kind in SCALAR_INDEXES.items():
                    if state["scalar_unindexed"][column] is None:
                        with _quiet():
                            self.items.create_index(column, config=configs[kind](), name=f"{column}_idx")
                        done.append(f"created {kind} index on {column}")
            keep = _dt.timedelta(seconds=float(older_than))
            with _quiet():
                self.items.optimize(cleanup_older_than=keep)
                self.settings_table.optimize(cleanup_older_than=keep)
                if len(self.items.list_versions()) > 1:  # an index retrain commits after the first cleanup
                    self.items.optimize(cleanup_older_than=keep)
            done.append("folded new rows into the indexes, compacted files, cleaned old versions")
        return {"actions": done, "index": self.index_state(), "versions": self.versions()}

    def versions(self) -> int:
        """Versions of the items table kept on disk (1 after ``optimize``)."""
        return len(self.items.list_versions())


def _table_names(db: Any) -> list[str]:
    listing = db.list_tables() if hasattr(db, "list_tables") else db.table_names()
    names = getattr(listing, "tables", listing)
    return [str(n) for n in names]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence LanceDB's deprecation and cleanup notices (we hold the writer lock the cleanup note is about)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _writer_lock(location: str) -> contextlib.AbstractContextManager[Path]:
    from capret.locks import exclusive_output

    if is_uri(location):
        digest = hashlib.sha256(location.encode()).hexdigest()[:16]
        return exclusive_output(
            cache_dir("catalogue-locks", digest), what=f"catalogue {location} (local lock)"
        )
    return exclusive_output(Path(location).resolve(), what="catalogue")
