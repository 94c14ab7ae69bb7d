"""Nearest-neighbour indexes over L2-normalised embeddings (inner product = cosine similarity).

One small protocol, four backends (DESIGN.md, "Indexes"):

* ``exact`` — chunked torch matmul + top-k, on GPU when present. It is the *reference*: every other backend is
  tested against it, and it scales to DeepFashion2 validation (12,550 x 24,012) and beyond because both the
  query and the gallery side are chunked, so memory stays bounded whatever the sizes.
* ``flat`` — faiss ``IndexFlatIP`` (exact; faiss' BLAS path), on all GPUs when ``faiss.get_num_gpus() > 0``.
* ``ivfpq`` — faiss ``IndexIVFPQ`` (inverted lists + product quantisation; approximate, for millions of items),
  by default wrapped in ``IndexRefineFlat``: the PQ search returns a shortlist of ``refine_factor * k`` candidates
  that are re-scored exactly against the stored float vectors. PQ codes alone rank neighbours coarsely (recall@10
  0.41 on the 1M x 64-d benchmark); re-scoring a short list restores it to 0.97 (see :data:`IVFPQ_DEFAULTS`).
  For galleries larger than memory, :mod:`capret.retrieval.sharded` builds the same index from sharded,
  memory-mapped features and re-scores the shortlist from disk.
* ``hnsw`` — faiss ``IndexHNSWFlat`` (graph search; approximate, CPU only in faiss).

Every backend takes arbitrary int64 ids in :meth:`add` (default ``0..n-1`` continuing the count) and returns
``(scores [Q, k] float32, ids [Q, k] int64)`` numpy arrays from :meth:`search`, best first. When fewer than ``k``
items are stored the missing slots hold id ``-1`` and score ``-inf`` (faiss' own convention, kept by ``exact``).
Indexes persist without pickle: faiss' ``write_index``/``read_index`` and safetensors for ``exact``;
:func:`load_index` recognises which from the file's first bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol, TypedDict, Unpack

import faiss
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from capret.errors import ConfigError, DataError, MissingFileError, UnknownNameError, require_finite
from capret.io import atomic_write, default_device
from capret.registry import Registry

__all__ = [
    "ExactIndex",
    "FaissIndex",
    "Index",
    "IVFPQ_DEFAULTS",
    "IvfpqOptions",
    "as_float32",
    "create_index",
    "describe",
    "exact_topk",
    "ivfpq_factory",
    "ivfpq_options",
    "list_indexes",
    "load_index",
    "register_index",
    "training_rows",
]


class Index(Protocol):
    """What every backend offers (the contract other modules code against)."""

    dim: int
    kind: str

    @property
    def ntotal(self) -> int: ...

    def add(self, vectors: Any, ids: Any = None) -> None: ...

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def save(self, path: str | Path) -> None: ...


_INDEXES: Registry[Index] = Registry("index")


def register_index(name: str) -> Any:
    """Decorator registering an index factory ``factory(dim, **options) -> Index`` under ``name``."""
    return _INDEXES.register(name)


def create_index(name: str, dim: int, **options: Any) -> Index:
    """Build an empty index ``name`` (exact | flat | ivfpq | hnsw) for ``dim``-dimensional vectors."""
    if int(dim) <= 0:
        raise ConfigError(f"index dim must be positive, got {dim}")
    return _INDEXES.create(name, dim=int(dim), **options)


def list_indexes() -> list[str]:
    return _INDEXES.names()


def as_float32(vectors: Any, *, dim: int, what: str) -> np.ndarray:
    """A C-contiguous float32 ``[n, dim]`` numpy copy/view of a numpy array or torch tensor."""
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().to("cpu", torch.float32).numpy()
    array = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"{what} must have shape [n, {dim}], got {list(array.shape)}")
    require_finite(array, what=what)
    return array


def _as_ids(ids: Any, *, n: int, start: int) -> np.ndarray:
    if ids is None:
        return np.arange(start, start + n, dtype=np.int64)
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    out = np.ascontiguousarray(np.asarray(ids).astype(np.int64, casting="safe").reshape(-1))
    if out.shape[0] != n:
        raise ValueError(f"got {out.shape[0]} ids for {n} vectors")
    return out


def training_rows(n: int, max_train: int, *, seed: int = 0) -> np.ndarray:
    """Sorted row numbers of the training sample of an IVF index over ``n`` vectors (all rows when ``n <=
    max_train``). One function for the in-memory and the sharded build, so both train on the same vectors."""
    if n <= max_train:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, max_train, replace=False)).astype(np.int64)


def _check_k(k: int) -> int:
    if int(k) <= 0:
        raise ConfigError(f"k must be a positive integer, got {k}")
    return int(k)


def exact_topk(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    *,
    max_block: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` inner products of every query over the gallery, chunked on both sides.

    A block of ``q_chunk x g_chunk`` scores is at most ``max_block`` floats (64 MiB by default), and the running
    top-k of each query chunk is merged block by block, so 1M-item galleries fit like 24k ones do. Rows with
    fewer than ``k`` gallery items are padded with score ``-inf`` and position ``-1``.

    Returns:
        ``(scores [Q, k] float32, positions [Q, k] int64)`` on the queries' device, positions index the gallery.
    """
    k = _check_k(k)
    num_q, num_g = queries.shape[0], gallery.shape[0]
    device = queries.device
    out_scores = torch.full((num_q, k), -math.inf, dtype=torch.float32, device=device)
    out_pos = torch.full((num_q, k), -1, dtype=torch.int64, device=device)
    if num_q == 0 or num_g == 0:
        return out_scores, out_pos
    g_chunk = max(1, min(num_g, max_block // 256))
    q_chunk = max(1, min(num_q, max_block // g_chunk))
    kk = min(k, num_g)
    for qs in range(0, num_q, q_chunk):
        q = queries[qs : qs + q_chunk]
        best_s: torch.Tensor | None = None
        best_p: torch.Tensor | None = None
        for gs in range(0, num_g, g_chunk):
            block = q @ gallery[gs : gs + g_chunk].T
            s, p = block.topk(min(kk, block.shape[1]), dim=1)
            p = p + gs
            if best_s is None or best_p is None:
                best_s, best_p = s, p
            else:
                merged_s = torch.cat([best_s, s], dim=1)
                merged_p = torch.cat([best_p, p], dim=1)
                best_s, order = merged_s.topk(min(kk, merged_s.shape[1]), dim=1)
                best_p = merged_p.gather(1, order)
        assert best_s is not None and best_p is not None
        out_scores[qs : qs + q.shape[0], : best_s.shape[1]] = best_s.float()
        out_pos[qs : qs + q.shape[0], : best_p.shape[1]] = best_p
    return out_scores, out_pos


class ExactIndex:
    """The reference backend: brute-force inner product with torch (GPU when present)."""

    kind = "exact"

    def __init__(self, dim: int, *, device: str | None = None, max_block: int = 1 << 24) -> None:
        self.dim = dim
        self.device = default_device(device)
        self.max_block = max_block
        self._vectors = torch.empty((0, dim), dtype=torch.float32, device=self.device)
        self._ids = torch.empty((0,), dtype=torch.int64, device=self.device)

    @property
    def ntotal(self) -> int:
        return int(self._vectors.shape[0])

    def add(self, vectors: Any, ids: Any = None) -> None:
        array = as_float32(vectors, dim=self.dim, what="vectors")
        id_array = _as_ids(ids, n=array.shape[0], start=self.ntotal)
        self._vectors = torch.cat([self._vectors, torch.from_numpy(array).to(self.device)])
        self._ids = torch.cat([self._ids, torch.from_numpy(id_array).to(self.device)])

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(as_float32(queries, dim=self.dim, what="queries")).to(self.device)
        scores, pos = exact_topk(q, self._vectors, k, max_block=self.max_block)
        ids = torch.where(pos >= 0, self._ids[pos.clamp(min=0)], torch.full_like(pos, -1))
        return scores.cpu().numpy(), ids.cpu().numpy()

    def reconstruct(self) -> tuple[np.ndarray, np.ndarray]:
        """All stored ``(vectors, ids)`` (exact copies)."""
        return self._vectors.cpu().numpy(), self._ids.cpu().numpy()

    def save(self, path: str | Path) -> None:
        vectors, ids = self.reconstruct()
        meta = {"capret_index": "exact", "dim": str(self.dim)}
        atomic_write(path, lambda tmp: save_file({"vectors": vectors, "ids": ids}, str(tmp), metadata=meta))


#: Defaults of the ``ivfpq`` index (``create_index("ivfpq", dim)``), chosen on the 1M x 64-d benchmark of
#: ``scripts/bench/search.py`` (clustered vectors, ``nlist = 4 * sqrt(n)`` = 4000; recall@10 against exact search).
#: Measured there (README, "Galleries beyond memory"): PQ codes alone reach 0.41 whatever ``nprobe`` (the codes,
#: not the lists, lose the neighbours); re-scoring a shortlist of ``refine_factor * k`` exactly lifts PQ16 (4 dims
#: per byte) to 0.90 at ``nprobe=32`` and 0.93 at 64 (shortlist 160), and PQ32 (``m = dim / 2``, 2 dims per byte)
#: to 0.94 at ``nprobe=32`` — there the lists are the limit — and 0.975 at ``nprobe=64``, ``refine_factor=8``
#: (sweep trained on 200k vectors); the benchmark itself, with exactly these defaults, measures 0.969.
#: ``nlist`` should grow like ``4 * sqrt(n)`` for large galleries (pass it; 1024 suits ~100k vectors).
IVFPQ_DEFAULTS: dict[str, int] = {
    "nlist": 1024,
    "nbits": 8,
    "nprobe": 64,
    "refine_factor": 8,
    "max_train": 100_000,
    "dims_per_code": 2,  # m = dim / dims_per_code sub-quantisers (rounded down to a divisor of dim)
}


class FaissIndex:
    """faiss backends (``flat``, ``ivfpq``, ``hnsw``) behind the same protocol.

    Ids live inside the faiss file (``IndexIDMap2`` for flat/HNSW, IVF's own id lists), so ``save``/``load``
    round-trips without any side file. The faiss index also describes itself: its kind, dimension, ``nprobe`` and
    refine factor are read from it (the factories set them on it, a loaded file carries them), so a new and a
    loaded index are built the same way. IVF-PQ is trained lazily on the first :meth:`add` (faiss needs the
    coarse centroids and PQ codebooks before it can encode), on at most ``max_train`` of those vectors.
    """

    def __init__(self, index: Any, *, max_train: int = IVFPQ_DEFAULTS["max_train"]) -> None:
        self.kind = _faiss_kind(index)
        self.dim = int(index.d)
        self.max_train = max_train
        self.nprobe, self.refine_factor = _ivf_search_params(index) if self.kind == "ivfpq" else (0, 0)
        self._cpu_index = index
        self._index = index
        self._on_gpu = False
        # faiss' GPU cloner has no IndexRefine: a refined IVF-PQ stays on the CPU.
        if self.kind in ("flat", "ivfpq") and not self.refine_factor and faiss.get_num_gpus() > 0:
            self._index = faiss.index_cpu_to_all_gpus(index)
            self._on_gpu = True
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        if self.kind == "ivfpq":
            faiss.ParameterSpace().set_index_parameter(self._index, "nprobe", self.nprobe)
            if self.refine_factor:
                faiss.ParameterSpace().set_index_parameter(self._index, "k_factor_rf", self.refine_factor)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def add(self, vectors: Any, ids: Any = None) -> None:
        array = as_float32(vectors, dim=self.dim, what="vectors")
        id_array = _as_ids(ids, n=array.shape[0], start=self.ntotal)
        if not self._index.is_trained:
            nlist = faiss.extract_index_ivf(self._cpu_index).nlist
            if array.shape[0] < nlist:
                raise DataError(
                    f"ivfpq needs at least nlist={nlist} vectors in its first add() to train, got {array.shape[0]}"
                )
            rows = training_rows(array.shape[0], self.max_train)
            self._index.train(array if len(rows) == array.shape[0] else array[rows])
            self._apply_search_params()
        self._index.add_with_ids(array, id_array)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_float32(queries, dim=self.dim, what="queries")
        k = _check_k(k)
        if self.ntotal == 0:
            return (
                np.full((q.shape[0], k), -np.inf, dtype=np.float32),
                np.full((q.shape[0], k), -1, dtype=np.int64),
            )
        scores, ids = self._index.search(q, k)
        scores = scores.astype(np.float32)
        scores[ids < 0] = -np.inf
        return scores, ids.astype(np.int64)

    def save(self, path: str | Path) -> None:
        index = faiss.index_gpu_to_cpu(self._index) if self._on_gpu else self._index
        atomic_write(path, lambda tmp: faiss.write_index(index, str(tmp)))  # never a torn index file


def _id_map(index: Any) -> Any:
    return faiss.IndexIDMap2(index)


@register_index("exact")
def _make_exact(dim: int, device: str | None = None, max_block: int = 1 << 24) -> ExactIndex:
    return ExactIndex(dim, device=device, max_block=max_block)


@register_index("flat")
def _make_flat(dim: int) -> FaissIndex:
    return FaissIndex(_id_map(faiss.IndexFlatIP(dim)))


def _default_pq_m(dim: int) -> int:
    """Sub-quantisers: ``dim / dims_per_code`` (2 dims per byte code) rounded down to a divisor of ``dim``."""
    m = max(1, dim // IVFPQ_DEFAULTS["dims_per_code"])
    while dim % m:
        m -= 1
    return m


def ivfpq_factory(dim: int, *, nlist: int, m: int | None = None, nbits: int = 8) -> Any:
    """An empty, untrained faiss ``IVF{nlist},PQ{m}x{nbits}`` inner-product index (ids stored in its lists)."""
    m = m or _default_pq_m(dim)
    if dim % m:
        raise ConfigError(f"ivfpq m={m} must divide dim={dim}")
    if int(nlist) < 1 or int(nbits) < 1:
        raise ConfigError(f"ivfpq needs nlist >= 1 and nbits >= 1, got nlist={nlist}, nbits={nbits}")
    index = faiss.index_factory(dim, f"IVF{int(nlist)},PQ{int(m)}x{int(nbits)}", faiss.METRIC_INNER_PRODUCT)
    # Polysemous training (Hamming-compatible code ordering) is only useful for polysemous search, which we do
    # not use, and it dominates training time (seconds even for 1,000 vectors).
    faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False  # type: ignore[attr-defined]
    return index


class IvfpqOptions(TypedDict, total=False):
    """The IVF-PQ knobs, taken as keywords by ``create_index("ivfpq", dim, ...)`` and by
    :func:`capret.retrieval.sharded.build_ivf_from_shards` (one declaration, one set of defaults and checks for
    the in-memory and the sharded build; see :func:`ivfpq_options`). ``m`` None: ``dim / 2`` sub-quantisers."""

    nlist: int
    m: int | None
    nbits: int
    nprobe: int
    refine_factor: int
    max_train: int


def ivfpq_options(options: IvfpqOptions) -> IvfpqOptions:
    """``options`` with :data:`IVFPQ_DEFAULTS` filled in, after the checks both builders need."""
    full: IvfpqOptions = {
        "nlist": IVFPQ_DEFAULTS["nlist"],
        "m": None,
        "nbits": IVFPQ_DEFAULTS["nbits"],
        "nprobe": IVFPQ_DEFAULTS["nprobe"],
        "refine_factor": IVFPQ_DEFAULTS["refine_factor"],
        "max_train": IVFPQ_DEFAULTS["max_train"],
    }
    unknown = sorted(set(options) - set(full))
    if unknown:  # keywords are checked statically too; this catches a typo in a config or a CLI option dict
        raise UnknownNameError(f"unknown ivfpq option {unknown[0]!r}; valid: {', '.join(full)}")
    full.update(options)
    if int(full["refine_factor"]) < 0:
        raise ConfigError(
            f"ivfpq refine_factor must be >= 0 (0 = no exact re-scoring), got {full['refine_factor']}"
        )
    return full


@register_index("ivfpq")
def _make_ivfpq(dim: int, **options: Unpack[IvfpqOptions]) -> FaissIndex:
    settings = ivfpq_options(options)
    index = ivfpq_factory(dim, nlist=settings["nlist"], m=settings["m"], nbits=settings["nbits"])
    faiss.extract_index_ivf(index).nprobe = int(settings["nprobe"])
    if settings["refine_factor"]:
        # The refine stage keeps the float vectors (flat) and re-scores the PQ shortlist exactly; IndexRefine
        # numbers vectors 0..n-1, so the ids live in an IDMap2 around it.
        refine = faiss.IndexRefineFlat(index)
        refine.k_factor = float(settings["refine_factor"])
        index = _id_map(refine)
    return FaissIndex(index, max_train=settings["max_train"])


@register_index("hnsw")
def _make_hnsw(dim: int, m: int = 32, ef_construction: int = 80, ef_search: int = 128) -> FaissIndex:
    index = faiss.IndexHNSWFlat(dim, int(m), faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = int(ef_construction)
    index.hnsw.efSearch = int(ef_search)
    return FaissIndex(_id_map(index))


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _faiss_kind(index: Any) -> str:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexRefine):
        inner = faiss.downcast_index(inner.base_index)
    if isinstance(inner, faiss.IndexIVFPQ):
        return "ivfpq"
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    raise DataError(f"unsupported faiss index type {type(inner).__name__}; valid: flat, ivfpq, hnsw")


def _ivf_search_params(index: Any) -> tuple[int, int]:
    """``(nprobe, refine_factor)`` of an IVF-PQ faiss index (refine factor 0: no exact re-scoring stage)."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    refine = int(inner.k_factor) if isinstance(inner, faiss.IndexRefine) else 0
    return int(faiss.extract_index_ivf(index).nprobe), refine


def load_index(path: str | Path, *, device: str | None = None) -> Index:
    """Read an index written by ``save`` (safetensors for ``exact``, a faiss file otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"index file not found: {path}")
    if _is_safetensors(path):
        try:
            tensors = load_file(str(path))
        except SafetensorError as exc:
            raise DataError(f"index file is truncated or corrupt ({exc})", path=path) from None
        if "vectors" not in tensors or "ids" not in tensors:
            raise DataError(f"{path}: not a capret exact index (needs tensors 'vectors' and 'ids')")
        exact = ExactIndex(int(tensors["vectors"].shape[1]), device=device)
        exact.add(tensors["vectors"], tensors["ids"])
        return exact
    try:
        index = faiss.read_index(str(path))  # already the concrete type; a second downcast would free it
    except RuntimeError as exc:  # faiss reports a torn or foreign file as a RuntimeError
        raise DataError(
            f"not a readable faiss index ({str(exc).strip().splitlines()[-1]})", path=path
        ) from None
    return FaissIndex(index)


def describe(index: Index) -> str:
    """One line naming the backend and size, for logs."""
    return json.dumps({"kind": getattr(index, "kind", "?"), "dim": index.dim, "ntotal": index.ntotal})
