"""The k-nearest-neighbour graph of one set of descriptors over itself, for the global rerankers.

αQE/DBA and k-reciprocal re-ranking both need every item's top-``k`` neighbours among the pooled queries and
gallery items (``N = Q + G``). That is an ``N x N`` similarity matrix: at DeepFashion2 validation scale (36,562
items) about 4.4x the work of the query-to-gallery search itself. The matrix is symmetric, so here each tile
``(i, j)`` with ``j > i`` is computed once and serves the rows of ``i`` and, transposed, the rows of ``j``: half the
matrix products, bounded memory (one ``block x block`` tile at a time), no Python loop over items.

Order: neighbours by similarity, ties towards the lower position — the order of a stable descending sort of each
row (tested against exactly that in ``tests/retrieval/test_knn.py``). Each (similarity, position) pair is packed
into one int64 key whose order is that order, so ``topk`` on keys is exact even among equal similarities.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

__all__ = ["KnnGraph", "gallery_graph", "pooled_knn", "self_knn"]

_LOW = (
    1 << 31
) - 1  # positions are stored as _LOW - position in the low 32 bits (lower position, larger key)


@dataclass(frozen=True)
class KnnGraph:
    """Every row's top-``k`` neighbours among all rows (itself included), best first."""

    sims: torch.Tensor  # [N, k] float32 similarities, descending
    positions: torch.Tensor  # [N, k] int64 row positions
    row_min: torch.Tensor  # [N] float32: each row's smallest similarity (its farthest item); [0] if not asked
    pair_sims: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [R, K] of the asked ``pairs``


def _keys(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like (value descending, position ascending) when sorted descending."""
    bits = (values.float() + 0.0).view(
        torch.int32
    )  # + 0.0 turns -0.0 into 0.0, as float comparison sees them
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return (ordered << 32) + (_LOW - positions)


def _decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ordered = (keys >> 32).to(torch.int32)
    values = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).view(torch.float32)
    return values, _LOW - (keys & 0xFFFFFFFF)


def _tile_keys(tile: torch.Tensor, k: int, offset: int) -> torch.Tensor:
    """Each row's top-``k`` keys of a full tile.

    Keys are built for a few spare candidates per row only; ``torch.topk`` picks an arbitrary member of a tie at
    its boundary, so a row whose k-th value equals its last spare one (identical descriptors, in practice) is
    redone from all its entries.
    """
    width = tile.shape[1]
    kk = min(k, width)
    spare = min(width, kk + 4)
    candidates, cols = tile.topk(spare, dim=1)
    keys = _keys(candidates, cols + offset).topk(kk, dim=1).values
    if spare < width:
        unsafe = (_decode(keys[:, -1])[0] == candidates[:, -1]).nonzero(as_tuple=True)[0]
        if unsafe.numel():
            every = torch.arange(offset, offset + width, device=tile.device).expand(unsafe.numel(), width)
            keys[unsafe] = _keys(tile[unsafe], every).topk(kk, dim=1).values
    return keys


def _merge(best: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Merge candidate ``keys`` of ``rows`` (grouped by row, ascending) into each row's running top-``k``."""
    num_rows = best.shape[0]
    counts = torch.bincount(rows, minlength=num_rows)
    slot = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    padded = torch.full((num_rows, int(counts.max())), torch.iinfo(torch.int64).min, device=best.device)
    padded[rows, slot] = keys
    touched = (counts > 0).nonzero(as_tuple=True)[0]
    out = best.clone()
    out[touched] = torch.cat([best[touched], padded[touched]], 1).topk(k, dim=1).values
    return out


#: Length of the strips whose maxima screen a tile before its entries are compared one by one.
STRIP = 64


def _reaching(
    tile: torch.Tensor, need: torch.Tensor, *, per: str, with_min: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries of ``tile`` that reach the need of their row (``per="row"``) or column (``per="column"``).

    Returns ``(owner, other, low)``: the entries' owner (row or column) positions grouped ascending, the other
    coordinate, and each owner's minimum over the tile when ``with_min`` (else an empty tensor).

    Each owner's line is cut into strips of :data:`STRIP` entries and one pass takes every strip's maximum; only
    the strips whose maximum reaches the owner's need are compared entry by entry (the minimum, when asked, is a
    second pass over the tile). A neighbour list gains about one entry per tile, so this reads the tile once
    instead of comparing, combining and scanning all of it. Strips always run along the tile's own memory layout
    (a reduction over a transposed view is many times slower).
    """
    axis = 1 if per == "row" else 0
    length = tile.shape[axis]
    main = length - length % STRIP
    body = tile.narrow(axis, 0, main).unflatten(
        axis, (main // STRIP, STRIP)
    )  # [R, S, STRIP] or [S, STRIP, C]
    reduce = axis + 1 if axis == 1 else 1
    highs = body.amax(reduce)
    # (torch.aminmax is several times slower than two reductions here)
    low = tile.amin(axis) if with_min else tile.new_empty(0)
    if axis == 1:
        owner, strip = (highs >= need[:, None]).nonzero(as_tuple=True)
        hit, offset = (body[owner, strip] >= need[owner, None]).nonzero(as_tuple=True)
    else:
        strip, owner = (highs >= need[None, :]).nonzero(as_tuple=True)
        hit, offset = (body[strip, :, owner] >= need[owner, None]).nonzero(as_tuple=True)
    owner, other = owner[hit], strip[hit] * STRIP + offset
    if main < length:
        rest = tile.narrow(axis, main, length - main)
        if axis == 1:
            o2, x2 = (rest >= need[:, None]).nonzero(as_tuple=True)
        else:
            x2, o2 = (rest >= need[None, :]).nonzero(as_tuple=True)
        owner, other = torch.cat([owner, o2]), torch.cat([other, x2 + main])
    if axis == 0 or main < length:
        order = owner.argsort(stable=True)
        owner, other = owner[order], other[order]
    return owner, other, low


def _threshold(best: torch.Tensor) -> torch.Tensor:
    """The similarity a candidate must reach to enter a row's (full) list: its k-th value."""
    return _decode(best[:, -1])[0]


def _blocks(lo: int, hi: int, size: int, k: int) -> list[int]:
    """Block starts over ``[lo, hi)``; the last block is merged into the one before if it is narrower than ``k``."""
    starts = list(range(lo, hi, size))
    while len(starts) > 1 and hi - starts[-1] < k:
        starts.pop()
    return starts


def self_knn(
    feats: torch.Tensor,
    k: int,
    *,
    block: int = 2048,
    with_row_min: bool = False,
    known: KnnGraph | None = None,
    pairs: torch.Tensor | None = None,
) -> KnnGraph:
    """Top-``k`` neighbours of every row of ``feats`` among all rows by inner product (see the module doc).

    The diagonal tiles are ranked in full first; they give every row a k-th-best value, and in each later tile
    only the entries that reach a row's (or a column's) current k-th value are gathered and merged — a few per
    row per tile — so selection costs one screening pass instead of a top-k per tile and direction.

    Args:
        feats: ``[N, D]`` descriptors (L2-normalised for cosine similarity).
        k: neighbours per row, itself included; capped at ``N``.
        block: tile side; one tile holds ``block**2`` floats (16 MiB at 2048, measured fastest on a CPU).
        with_row_min: also compute each row's smallest similarity (k-reciprocal's distance normaliser);
            otherwise ``row_min`` is empty.
        known: the graph of the LAST ``M`` rows among themselves (positions ``0..M-1``, at least ``k`` per row,
            ``row_min`` when ``with_row_min``), e.g. a gallery's graph kept by :func:`pooled_knn`; the tiles
            inside those rows are then not computed again.
        pairs: ``[R, K]`` positions whose similarity to rows ``0..R-1`` is wanted too (a reranker's candidates):
            read from the tiles as they pass (``pair_sims``) instead of gathering descriptors again.
    """
    n = feats.shape[0]
    if n == 0:
        raise ValueError("self_knn needs at least one row")
    if k < 1 or block < 1:
        raise ValueError(f"self_knn needs k >= 1 and block >= 1, got k={k}, block={block}")
    k = min(k, n)
    split = n - known.positions.shape[0] if known is not None else n
    if known is not None and (split < k or known.positions.shape[1] < k):
        known, split = None, n  # too few new rows to fill their lists from their own tile: compute everything
    size = max(block, k)  # every tile is at least k wide, so the diagonal pass fills every row's list
    starts = _blocks(0, split, size, k) + (_blocks(split, n, size, 1) if split < n else [])
    ends = [*starts[1:], n]
    row_min = torch.full((n if with_row_min else 0,), torch.inf, device=feats.device)
    pair_sims = torch.full(pairs.shape if pairs is not None else (0,), torch.nan, device=feats.device)
    best: list[torch.Tensor] = []
    for i0, i1 in zip(starts, ends, strict=True):
        if known is not None and i0 >= split:
            sims, pos = known.sims[i0 - split : i1 - split, :k], known.positions[i0 - split : i1 - split, :k]
            best.append(_keys(sims, pos + split))
            if with_row_min:
                row_min[i0:i1] = known.row_min[i0 - split : i1 - split]
            continue
        rows = feats[i0:i1]
        tile = (rows @ rows.T).float()
        _take_pairs(pair_sims, pairs, tile, (i0, i1, i0, i1))
        best.append(_tile_keys(tile, k, i0))
        if with_row_min:
            row_min[i0 : i0 + tile.shape[0]] = torch.amin(tile, 1)
    for a, (i0, i1) in enumerate(zip(starts, ends, strict=True)):
        if i0 >= split:
            break  # tiles among the known rows: already in their lists
        rows = feats[i0:i1]
        for b in range(a + 1, len(starts)):
            j0 = starts[b]
            tile = (rows @ feats[j0 : ends[b]].T).float()
            _take_pairs(pair_sims, pairs, tile, (i0, i1, j0, ends[b]))
            _take_pairs(pair_sims, pairs, tile.T, (j0, ends[b], i0, i1))
            # entries that reach the k-th value of their row (block a) or of their column (block b); ties are
            # kept, since a lower position wins them
            r, c, low = _reaching(tile, _threshold(best[a]), per="row", with_min=with_row_min)
            if r.numel():
                best[a] = _merge(best[a], r, _keys(tile[r, c], c + j0), k)
            c, r, low_t = _reaching(tile, _threshold(best[b]), per="column", with_min=with_row_min)
            if c.numel():
                best[b] = _merge(best[b], c, _keys(tile[r, c], r + i0), k)
            if with_row_min:
                span_a, span_b = slice(i0, i0 + tile.shape[0]), slice(j0, j0 + tile.shape[1])
                row_min[span_a] = torch.minimum(row_min[span_a], low)
                row_min[span_b] = torch.minimum(row_min[span_b], low_t)
    if pairs is not None:
        r, c = pair_sims.isnan().nonzero(as_tuple=True)  # pairs inside the known rows: not in any tile here
        if r.numel():
            x, y = feats.index_select(0, r), feats.index_select(0, pairs[r, c])
            pair_sims[r, c] = torch.bmm(x[:, None, :], y[:, :, None]).view(-1).float()
    sims, positions = _decode(torch.cat(best))
    return KnnGraph(sims=sims, positions=positions, row_min=row_min, pair_sims=pair_sims)


def _take_pairs(
    out: torch.Tensor, pairs: torch.Tensor | None, tile: torch.Tensor, span: tuple[int, int, int, int]
) -> None:
    """Copy the asked pairs that fall in ``tile`` (rows ``r0:r1`` x columns ``c0:c1``) into ``out``."""
    r0, r1, c0, c1 = span
    if pairs is None or r0 >= pairs.shape[0]:
        return
    wanted = pairs[r0:r1]
    r, c = ((wanted >= c0) & (wanted < c1)).nonzero(as_tuple=True)
    out[r0 + r, c] = tile[r, wanted[r, c] - c0]


#: Neighbours kept per gallery item in a cached gallery graph: enough for αQE (k=10) and k-reciprocal (k1+1=21)
#: at their defaults, so a sweep over either reuses one graph.
GALLERY_K = 21
#: Gallery graphs kept in this process (most recent first out last).
GALLERY_CACHE_SIZE = 2
_gallery_graphs: OrderedDict[str, KnnGraph] = OrderedDict()


def _fingerprint(x: torch.Tensor) -> str:
    data = x.detach().contiguous().cpu()
    digest = hashlib.sha1(data.view(torch.uint8).numpy().tobytes())
    digest.update(f"{tuple(x.shape)}{x.dtype}{x.device}".encode())
    return digest.hexdigest()


def gallery_graph(gallery: torch.Tensor, k: int, *, cache: bool = True, block: int = 2048) -> KnnGraph:
    """The k-NN graph of a gallery among itself (with row minima), kept per gallery content in this process.

    The gallery-to-gallery tiles are about 45% of the pooled graph the global rerankers need at DeepFashion2
    scale and do not depend on the queries, so a second reranking of the same gallery (another reranker, other
    settings, the next batch of queries) skips them. Keyed by a SHA-1 of the descriptors' bytes; at least
    :data:`GALLERY_K` neighbours are kept so that the defaults of every reranker share one graph.
    """
    want = max(k, min(GALLERY_K, gallery.shape[0]))
    key = _fingerprint(gallery) if cache else ""
    hit = _gallery_graphs.get(key) if cache else None
    if hit is not None and hit.positions.shape[1] >= min(k, gallery.shape[0]):
        _gallery_graphs.move_to_end(key)
        return hit
    graph = self_knn(gallery, want, block=block, with_row_min=True)
    if cache:
        _gallery_graphs[key] = graph
        while len(_gallery_graphs) > GALLERY_CACHE_SIZE:
            _gallery_graphs.popitem(last=False)
    return graph


def pooled_knn(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    *,
    with_row_min: bool = False,
    cache: bool = True,
    candidates: torch.Tensor | None = None,
) -> KnnGraph:
    """The k-NN graph of ``[queries; gallery]`` over itself (queries first), with the gallery's own graph from
    :func:`gallery_graph`; equal to ``self_knn(torch.cat([queries, gallery]), k)``. ``candidates`` (``[Q, K]``
    gallery positions) asks for the queries' similarities to them as ``pair_sims``."""
    known = gallery_graph(gallery, k, cache=cache) if gallery.shape[0] else None
    pairs = None if candidates is None else candidates + queries.shape[0]
    return self_knn(torch.cat([queries, gallery], 0), k, with_row_min=with_row_min, known=known, pairs=pairs)
